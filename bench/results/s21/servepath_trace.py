import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
dec = [r for r in rows if r["tokens"] == r["reqs"] and r["reqs"] >= int(sys.argv[2] if len(sys.argv) > 2 else 60)]
print("steps", len(rows), "pure decode steps (reqs>=N)", len(dec))
s = [r["s"] * 1e3 for r in dec]
print("step s p50 %.1f mean %.1f" % (st.median(s), st.mean(s)))
gaps = []
for a, b in zip(rows, rows[1:]):
    if a in dec and b["tokens"] == b["reqs"]:
        gaps.append((b["t"] - a["t"] - a["s"]) * 1e3)
if gaps: print("gap after decode step (ms) p50 %.2f mean %.2f p90 %.2f" % (st.median(gaps), st.mean(gaps), sorted(gaps)[int(.9*len(gaps))]))
