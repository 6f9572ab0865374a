import torch, flux_attention as fa
q=torch.zeros(2,8,4,16,dtype=torch.int32,device="cuda"); k=torch.randn(2,8,2,16,device="cuda"); v=k.clone()
try:
    fa.full_attention(q,k,v,causal=True)
except RuntimeError as e:
    print("raised:", str(e)[:200])
