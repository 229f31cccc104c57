"""neural-quantization: GPTQ quantization of Hugging Face causal LMs."""
