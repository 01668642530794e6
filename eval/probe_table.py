"""Reads lane_probe.py's JSON lines on stdin and prints them as a compact table (for device logs)."""
import json
import sys

print(f"{'thr':>3} {'main':>4} {'load':>10} {'per':>3} {'gap':>4} {'cpu ms/exp':>10} {'pcie GB/s':>9}")
for line in sys.stdin:
    if line.startswith("{"):
        r = json.loads(line)
        print(f"{r['threads']:>3} {r['main_threads']:>4} {r['load']:>10} {r['experts_per_call']:>3} {r['gap_ms']:>4} "
              f"{r['cpu_ms_per_expert']:>10.3f} {r['pcie_gb_s']:>9.1f}")
