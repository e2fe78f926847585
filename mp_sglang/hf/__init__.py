"""Multipole in HF transformers: `attn_implementation="multipole"` (attention.py), its CUDA decode
path over the Triton kernels (kernels.py), and lm-eval's CLI with it registered (lm_eval.py).

Importing this package registers the implementation with transformers.
"""

from mp_sglang.hf import attention  # noqa: F401  (registers attn_implementation="multipole")
