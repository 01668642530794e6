"""The network itself: config, checkpoint layout and reader, DeepSeek-V2 forward pass, synthetic checkpoints."""
