"""The offloading runtime: expert store and cache, the executor and its pieces, memory budget, statistics."""
