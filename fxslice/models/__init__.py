"""Models in and out: capture (hub name, directory, GGUF, `nn.Module`), KV-cache capture, save/load, HF wrapper."""
