"""Offline (issue 21): the per-depth scale against a scale per (depth, top-1 child or a sibling), on the nodes that
`benchmarks.calibration_offline collect` saved: where the marginal nodes of the top-m come from, and whether splitting
each depth's scale by sibling rank removes their overvaluation. Fit on each tree's top 32 (as verified), one half of
the prompts, evaluated on the other.

    python -m benchmarks.calibration_siblings /tmp/nodes.npz
"""
import sys
import numpy as np
from benchmarks.calibration_offline import *
z=np.load(sys.argv[1]); v=np.maximum(z['value'],1e-12); y=z['accepted'].astype(float); depth=z['depth']; parent=z['parent']
D=7; tree_id=z['set']*100000+z['prompt']*1000+z['step']; half=z['prompt']%2
p=np.zeros_like(v)
for h in (0,1):
    train=half!=h; fitted=train
    for _ in range(3):
        s=fit_depth(v[fitted],y[fitted],depth[fitted],D)
        r=cap_by_parent(pred_depth(s,v,depth),parent,depth); fitted=train&(top_ranks(r,tree_id)<31)
    print('scales',np.round(s,2))
    p[half==h]=pred_depth(s,v,depth)[half==h]
p=cap_by_parent(p,parent,depth)
# sibling rank by value
key=np.where(parent>=0,parent,-1-tree_id)  # group: same parent (depth-1 nodes grouped by tree)
order=np.lexsort((-v,key)); st=np.searchsorted(key[order],key[order]); srank=np.empty(len(v),int); srank[order]=np.arange(len(v))-st
rank=top_ranks(p,tree_id)
for lo,hi in ((0,7),(7,15),(15,31),(31,63)):
    m=(rank>=lo)&(rank<hi)
    for nm,c in (('top-1 child',srank==0),('2nd+ child',srank>0)):
        mm=m&c
        print(f"ranks {lo+2}-{hi+1} {nm}: n/tree {mm.sum()/len(np.unique(tree_id)):.2f} predicted {p[mm].sum()/len(np.unique(tree_id)):.3f} accepted {y[mm].sum()/len(np.unique(tree_id)):.3f} ratio {p[mm].sum()/max(y[mm].sum(),1):.2f}")
print("--- f: scale per (depth, top-1 child or not)")
grp=(depth-1)*2+(srank>0)
def fitf(m):
    return np.array([(y[m&(grp==g)].sum()+0.25)/(v[m&(grp==g)].sum()+0.25) for g in range(2*D)])
pf=np.zeros_like(v)
for h in (0,1):
    train=half!=h; fitted=train
    for _ in range(3):
        s=fitf(fitted); r=cap_by_parent(s[grp]*v,parent,depth); fitted=train&(top_ranks(r,tree_id)<31)
    print('scales top1/other',np.round(s.reshape(D,2).T,2))
    pf[half==h]=(s[grp]*v)[half==h]
pf=cap_by_parent(pf,parent,depth)
T=len(np.unique(tree_id))
for nm,pp in (('a',p),('f',pf)):
    pc=np.clip(pp,1e-6,1-1e-6); print(nm,'Brier %.5f logloss %.4f'%(np.mean((pc-y)**2),-np.mean(y*np.log(pc)+(1-y)*np.log1p(-pc))))
    rk=top_ranks(pp,tree_id)
    for mm in (8,16,32,64):
        top=rk<mm-1; mg=(rk>=mm//2-1)&top
        print(f"  m={mm}: expected {pp[top].sum()/T:.3f} accepted {y[top].sum()/T:.3f} | marginal {pp[mg].sum()/T:.3f} vs {y[mg].sum()/T:.3f} ratio {pp[mg].sum()/y[mg].sum():.2f}")
