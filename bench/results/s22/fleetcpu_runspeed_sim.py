import json, sys
sys.path.insert(0, '/work/wt-fleetcpu'); sys.path.insert(0, '/work/wt-fleetcpu/bench')
from dataclasses import replace
from tokenmill.perf.cost_model import CostModel
from tokenmill.perf.fleet import FleetSpec, simulate_fleet
from tokenmill.perf.simulator import SimConfig, requests_from_workload
from tokenmill.perf.cli import CHAT_TEMPLATE_TOKENS
from goodput_compare import default_tokenizer
tok=default_tokenizer()
B='/work/wt-fleetcpu/bench/results/s21/'
for run in (1,2,3):
    d=json.load(open(B+f'fleetcal_disagg_run{run}.json'))
    sc=d['served_calibration']; sp=d['spec']; path=sc['path']
    spec=FleetSpec(instances=2, prefill_instances=1, router_policy='least-load', transfer_s_per_block=max(0,sp['transfer_s_per_block']),
        transfer_s_per_pull=max(0,sp['transfer_s_per_pull']), hop_s=path['hop_s'], ingress_s=sp['ingress_s'], return_s=path['return_s'],
        hop_s_per_request=path['hop_s_per_request'], step_gap_s=sc['prefill_step_gap_s'], decode_step_gap_s=sc['decode_step_gap_s'])
    pf=CostModel.from_dict(sc['prefill_cost_model']); df=CostModel.from_dict(sc['decode_cost_model'])
    for r in d['rows']:
        reqs=requests_from_workload('chat:ignore_eos=1', 40, r['rate'], 0, chat_overhead=CHAT_TEMPLATE_TOKENS, tokenizer=tok)
        meas=r['measured']['ttft_p50_ms']
        rs=r['interleaved']['run_speed']['vs_first_pass']
        out=[]
        for label,fp,fd in (("pass0",1,1),("prod at run speed",rs['prefill'],1),("both at run speed",rs['prefill'],rs['decode'])):
            s=simulate_fleet(reqs, pf.scaled(fp), SimConfig(policy='fcfs'), spec, rate=r['rate'], decode_cost=df.scaled(fd)).summary()
            out.append(f"{label} {s['ttft_ms']['p50']:.0f} ({s['ttft_ms']['p50']/meas-1:+.0%}) tpot {s['tpot_ms']['p50']/r['measured']['tpot_p50_ms']-1:+.0%}")
        print(f"run{run} rate{r['rate']:g} measured {meas:.0f}: "+" | ".join(out), f"speeds {rs['prefill']:.3f}/{rs['decode']:.3f}")
