"""The engine and its command line: generation loop, CUDA graphs, sampling, options, errors, tokenizers."""
