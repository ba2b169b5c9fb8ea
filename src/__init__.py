"""Triadic split computing for LLaMA-family models: Edge -> Cloud -> Edge."""
import logging

# bitsandbytes (imported by peft for --lora-weights, and for --load-in-8bit) warns at import, on a CPU with AVX-512
# bf16, that its optional 4-bit CPU kernel (the `kernels` package) is missing: nothing here uses 4-bit weights, and
# a user's error must stay one line.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
