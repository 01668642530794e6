"""Run DeepSeek-V2(-Lite) on one GPU with routed experts offloaded to pinned CPU memory."""
