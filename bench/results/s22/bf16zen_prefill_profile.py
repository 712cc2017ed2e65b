import sys, time, cProfile, pstats, io
sys.path.insert(0, "bench")
import torch
from cpu_batch_steps import _scheduler, _add, _step
from tokenmill.engine.llm import LLM
llm = LLM(model="/tmp/vllmcpu/smollm2-hf", dtype="bfloat16", enable_prefix_caching=False, num_threads=2, max_num_seqs=10)
core = llm.engine.core
for r in range(2):
    sched = _scheduler(core.runner, core.config.scheduler, core.config.cache.block_size)
    _add(sched, 10, 1, f"w{r}_")
    print("warm", _step(sched, core.runner)[1])
sched = _scheduler(core.runner, core.config.scheduler, core.config.cache.block_size)
_add(sched, 10, 1, "p_")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    pr = cProfile.Profile(); pr.enable()
    print("step", _step(sched, core.runner)[1])
    pr.disable()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(15); print(s.getvalue())
