"""Measurement and demo tools: activation capture, fidelity and agreement probes, the bundled
SmolLM2 model, and the fidelity demo (`python -m mp_sglang.tools.demo`)."""
