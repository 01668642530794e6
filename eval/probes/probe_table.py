"""Reads lane_probe.py's JSON lines on stdin and prints them as a compact table (for device logs)."""
import json
import sys

print(f"{'threads':>7} {'where':>7} {'experts/call':>12} {'ms/expert':>9} {'PCIe GB/s':>9}")
for line in sys.stdin:
    if line.startswith("{"):
        r = json.loads(line)
        print(f"{r['threads']:>7} {r['where']:>7} {r['experts_per_call']:>12} {r['cpu_ms_per_expert']:>9.3f} "
              f"{r['pcie_gb_s']:>9.1f}")
