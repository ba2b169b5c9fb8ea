"""Privacy evaluation: what an eavesdropper on the link, or a curious cloud, recovers from the hidden states.

    python -m bench.privacy            # writes results/privacy.md, results/privacy_recovery.png, results/privacy_fidelity.png

The attacker plays against what actually crosses the link: the bytes the Edge sends and the Cloud
returns, recorded by a wrapper around the cloud's `handle` and decoded with `protocol.decode`, per
codec. It knows the public weights of the embedded model (SmolLM2-135M-Instruct) and trains its
attack models only on the two training texts (bench/data/train_*.txt); it is scored on the held-out
text (bench/data/heldout_lighthouse.txt). Attacks:

    input tokens, from edge->cloud states at cut a:
      nn       cosine nearest neighbour of the state among the token embeddings
      ridge    ridge regression from the (norm-scaled, standardised) layer-a state to the token's
               unit embedding, then the nearest embedding; lambda picked on a held-out slice of the
               training text
      match    public-weights forward matching: for each position, the ridge probe's top-K tokens are
               pushed through the public layers 0..a-1 (context from the ridge's guesses at earlier
               positions) and the one whose layer-a state is closest to the observed state wins
    output tokens, from cloud->edge states at cut b:
      replay   the public layers b..L-1, final norm and head, run on the received states in the
               order they arrive, exactly as the edge does
      lens     final norm and head only, on the received state (an attacker without the tail layers)
    the layer of a message under random cuts:
      START    the START message carries the schedule seed in clear; the split sets follow from its
               fingerprint (CRC-32 of the sets) by trying every pair of contiguous ranges
      classifier  a ridge classifier on per-position state features, summed over the message

Everything runs on CPU; the whole run takes a few minutes (see the runtime line of the report).

Modules: capture (what an observer of the link records and reads: the recording link, the HIDDEN
messages, exposures, the schedule from START), attacks (clean states, probes, matcher, layer
classifier, replay), experiments (the four measurements), report (plots and results/privacy.md),
__main__ (the command line).
"""
