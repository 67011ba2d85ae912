"""What a LLaMA checkpoint is, for both sides: its config, its safetensors weights and fingerprint, presets."""
