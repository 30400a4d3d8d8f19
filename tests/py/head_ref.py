"""An iBOT projection head laid out as the official models/head.py builds it (iBOTHead on top of
DINOHead), written here from its semantics with plain torch: the MLP is a Sequential of Linear,
the norm, the activation, ...; `norm_in_head` builds ONE norm module that is appended after
every hidden Linear (so its parameters are shared and the state dict names them under every
index); `last_layer` / `last_layer2` are weight-normed bias-free Linears, `last_layer2` being
`last_layer` itself with `shared_head`. For tests/model.rs.

Usage: python head_ref.py IN.npz OUT.npz
IN.npz: cfg [in_dim, out_dim, patch_out_dim, hidden_dim, bottleneck_dim, nlayers, ln, relu,
        shared_head], tokens [B, 1 + N, in_dim], rows [M, in_dim], and every state-dict tensor
        of the head as `sd/<key>` (loaded with load_state_dict(strict=True): a missing or
        unexpected key is an error).
OUT.npz: x1 [B, out_dim], x2 [B, N, patch_out_dim] (head on tokens), y [M, out_dim] (head on
         rows), state_dict_keys and named_parameters (UTF-8 bytes of the names joined by
         newlines).
"""
import sys
import warnings

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=FutureWarning)  # nn.utils.weight_norm, as official


class Head(nn.Module):
    def __init__(self, in_dim, out_dim, patch_out_dim, hidden_dim, bottleneck_dim, nlayers,
                 ln, relu, shared_head):
        super().__init__()
        norm = nn.LayerNorm(hidden_dim) if ln else None
        act = nn.ReLU() if relu else nn.GELU()
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim if bottleneck_dim > 0 else out_dim)
        else:
            layers = []
            for i in range(nlayers - 1):
                layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim))
                if norm is not None:
                    layers.append(norm)  # the same module every time
                layers.append(act)
            layers.append(nn.Linear(hidden_dim, bottleneck_dim if bottleneck_dim > 0 else out_dim))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = None
        if bottleneck_dim > 0:
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        if shared_head:
            if bottleneck_dim > 0:
                self.last_layer2 = self.last_layer
            else:
                self.mlp2 = self.mlp[-1]
                self.last_layer2 = None
        else:
            if bottleneck_dim > 0:
                self.last_layer2 = nn.utils.weight_norm(
                    nn.Linear(bottleneck_dim, patch_out_dim, bias=False))
            else:
                self.mlp2 = nn.Linear(hidden_dim, patch_out_dim)
                self.last_layer2 = None

    def forward(self, x):
        if x.dim() == 2:
            x = self.mlp(x)
            if self.last_layer is not None:
                x = self.last_layer(F.normalize(x, dim=-1, p=2))
            return x
        if self.last_layer is not None:
            x = F.normalize(self.mlp(x), dim=-1, p=2)
            return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])
        x = self.mlp[:-1](x)
        return self.mlp[-1](x[:, 0]), self.mlp2(x[:, 1:])


d = np.load(sys.argv[1])
cfg = [int(v) for v in d["cfg"]]
head = Head(*cfg[:6], bool(cfg[6]), bool(cfg[7]), bool(cfg[8]))
sd = {k[len("sd/"):]: torch.from_numpy(d[k]) for k in d.files if k.startswith("sd/")}
head.load_state_dict(sd, strict=True)
with torch.no_grad():
    x1, x2 = head(torch.from_numpy(d["tokens"]))
    y = head(torch.from_numpy(d["rows"]))


def names(ks):
    return np.frombuffer("\n".join(ks).encode(), dtype=np.uint8)


np.savez(
    sys.argv[2],
    x1=x1.numpy(),
    x2=x2.numpy(),
    y=y.numpy(),
    state_dict_keys=names(list(head.state_dict().keys())),
    named_parameters=names([n for n, _ in head.named_parameters()]),
)
