import sys, collections
# raw (collapsed) format: "frame;frame;... count"
self_c = collections.Counter(); incl = collections.Counter(); total = 0
for line in open(sys.argv[1]):
    line = line.rstrip()
    if not line: continue
    stack, n = line.rsplit(" ", 1); n = int(n)
    frames = stack.split(";")
    total += n
    self_c[frames[-1]] += n
    for f in set(frames):
        incl[f] += n
print("total samples", total)
print("--- self")
for f, n in self_c.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 25): print(f"{100*n/total:5.1f}% {f}")
print("--- inclusive")
for f, n in incl.most_common(int(sys.argv[3]) if len(sys.argv) > 3 else 40): print(f"{100*n/total:5.1f}% {f}")
