#!/usr/bin/env python3
"""Fused vs separate q/k/v and gate/up projections in libtorch (bf16, 2 threads), and the cost of
concatenating the weights: the measurement behind fusing only resident layers (docs/BENCHMARKS.md).
Run: ~/.cache/rabbitllm/venv-torch-2.11.0/bin/python benches/fuse_projections.py
"""
import torch, time
torch.set_num_threads(2)
def bench(f, n=300):
    for _ in range(20): f()
    ts=[]
    for _ in range(5):
        t=time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter()-t)/n)
    return sorted(ts)[2]
for name,h,q,kv,m in [("0.5b",896,896,128,4864),("1.5b",1536,1536,256,8960)]:
  for M in [1,32]:
    x=torch.randn(1,M,h,dtype=torch.bfloat16)
    wq=torch.randn(q,h,dtype=torch.bfloat16); wk=torch.randn(kv,h,dtype=torch.bfloat16); wv=torch.randn(kv,h,dtype=torch.bfloat16)
    bq=torch.randn(q,dtype=torch.bfloat16); bk=torch.randn(kv,dtype=torch.bfloat16); bv=torch.randn(kv,dtype=torch.bfloat16)
    wqkv=torch.cat([wq,wk,wv]); bqkv=torch.cat([bq,bk,bv])
    wg=torch.randn(m,h,dtype=torch.bfloat16); wu=torch.randn(m,h,dtype=torch.bfloat16); wgu=torch.cat([wg,wu])
    F=torch.nn.functional
    sep=bench(lambda: (F.linear(x,wq,bq),F.linear(x,wk,bk),F.linear(x,wv,bv)))
    fus=bench(lambda: F.linear(x,wqkv,bqkv).split([q,kv,kv],-1))
    sepm=bench(lambda: F.silu(F.linear(x,wg))*F.linear(x,wu), 100)
    fusm=bench(lambda: (lambda y: F.silu(y[...,:m])*y[...,m:])(F.linear(x,wgu)), 100)
    cat=bench(lambda: torch.cat([wq,wk,wv]), 100)
    catm=bench(lambda: torch.cat([wg,wu]), 30)
    print(f"{name} M={M}: qkv sep {sep*1e6:.0f}us fused {fus*1e6:.0f}us (cat {cat*1e6:.0f}us) | gate/up sep {sepm*1e6:.0f}us fused {fusm*1e6:.0f}us (cat {catm*1e6:.0f}us)")
