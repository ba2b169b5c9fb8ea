import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import make_tiny_checkpoint  # noqa: E402

def stop_process(process, grace: float = 15.0) -> None:
    """Terminate a test's subprocess, and kill it if it has not ended after `grace` seconds."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """A loopback port free at the time of asking, for a server that must be told its port before it starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# One thread: on a shared or busy machine, two threads thrash on the small decode matmuls.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_tied"), seed=0, num_layers=4, tie=True)


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_untied"), seed=1, num_layers=4, tie=False)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct: its folder, the unsplit HF model and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from src.checkpoint import embedded_model_dir

    folder = embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    return folder, model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def japan_ids(embedded):
    from src.utils import format_prompt

    return format_prompt(embedded[2], "Tell me about Japan.", "auto")


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory, embedded):
    """A tiny random-init model over SmolLM2's vocabulary, with its tokenizer: fast, and it has text (CLI, compare)."""
    _, _, tokenizer = embedded
    folder, model = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_vocab"), seed=3, vocab_size=len(tokenizer), eos_token_id=2, pad_token_id=2)
    tokenizer.save_pretrained(folder)
    return folder, model
