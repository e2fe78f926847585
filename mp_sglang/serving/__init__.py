"""The SGLang runtime: the plugin that registers `--attention-backend multipole`, the backend, its
CUDA kernel path, and the per-request cluster indexes beside SGLang's KV pool."""
