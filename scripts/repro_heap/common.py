"""Shared model code (torchvision/timm style) and comparison helpers."""
import copy
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import bnlab
import bnlab.nn as bnn

# (the original asserted that bnlab was imported from a fresh clone)


def conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False, groups=groups)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, k=3):
        super().__init__()
        cv = conv3x3 if k == 3 else conv1x1
        self.conv1 = cv(inplanes, planes, stride, groups=groups)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = cv(planes, planes, groups=groups)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Net2d(nn.Module):
    """stem conv -> BN -> ReLU(inplace) at exactly C x H x W, a BasicBlock at C x H x W,
    a downsampling BasicBlock (stride 2, conv1x1+BN downsample), pool, fc.
    Large C uses depthwise 3x3 convs (MobileNet-like) to keep the cost down."""

    def __init__(self, cin, C, ncls=10, bottleneck=False):
        super().__init__()
        # large C: grouped 1x1 convs (torch's float64 grouped 3x3 conv is extremely slow on CPU)
        g = {85: 5, 256: 32, 512: 64, 1000: 125}.get(C, 1) if C > 64 else 1
        k = 1 if C > 64 else 3
        self.conv1 = nn.Conv2d(cin, C, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(C)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(C, C, groups=g, k=k))
        ds = nn.Sequential(conv1x1(C, C, stride=2, groups=g), nn.BatchNorm2d(C))
        self.layer2 = nn.Sequential(BasicBlock(C, C, stride=2, downsample=ds, groups=g, k=k))
        if bottleneck:
            ds2 = nn.Sequential(conv1x1(C, 4 * max(1, C // 4)), nn.BatchNorm2d(4 * max(1, C // 4)))
            self.layer3 = nn.Sequential(Bottleneck(C, max(1, C // 4), downsample=ds2))
            cout = 4 * max(1, C // 4)
        else:
            self.layer3 = nn.Identity()
            cout = C
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cout, ncls)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class MLP1d(nn.Module):
    """(N, C) BatchNorm1d: Linear -> BN1d -> ReLU(inplace) twice, residual."""

    def __init__(self, fin, C, ncls=10):
        super().__init__()
        self.fc1 = nn.Linear(fin, C, bias=False)
        self.bn1 = nn.BatchNorm1d(C)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(C, C, bias=False)
        self.bn2 = nn.BatchNorm1d(C)
        self.head = nn.Linear(C, ncls)

    def forward(self, x):
        x = self.relu(self.bn1(self.fc1(x)))
        identity = x
        out = self.bn2(self.fc2(x))
        out += identity
        out = self.relu(out)
        return self.head(out)


class Conv1dNet(nn.Module):
    """(N, C, L) BatchNorm1d."""

    def __init__(self, cin, C, ncls=10):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, C, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(C)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(C, C, 3, padding=1, bias=False, groups=C if C > 64 else 1)
        self.bn2 = nn.BatchNorm1d(C)
        self.head = nn.Linear(C, ncls)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        identity = x
        out = self.bn2(self.conv2(x))
        out += identity
        out = self.relu(out)
        return self.head(out.mean(-1))


class Conv3dNet(nn.Module):
    def __init__(self, cin, C, ncls=10):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, C, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(C)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(C, C, 3, padding=1, bias=False, groups=C if C > 32 else 1)
        self.bn2 = nn.BatchNorm3d(C)
        self.head = nn.Linear(C, ncls)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        identity = x
        out = self.bn2(self.conv2(x))
        out += identity
        out = self.relu(out)
        return self.head(out.mean((2, 3, 4)))


def bn_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            or bnn.is_batchnorm(m)]


def buffers(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k}


def relerr(a, b):
    a = a.detach().double()
    b = b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    both_nan = torch.isnan(a) & torch.isnan(b)
    if (torch.isnan(a) != torch.isnan(b)).any():
        return float("nan")
    a = torch.where(both_nan, 0, a)
    b = torch.where(both_nan, 0, b)
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0:
        return num
    return num / den


def train_run(model, inputs, targets, steps, lr=0.1, mom=0.9, memfmt=None):
    """Return per-step losses, grads after each step (list of dicts), buffers, eval outputs."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mom)
    model.train()
    losses, grads = [], []
    for s in range(steps):
        x = inputs[s]
        if memfmt is not None:
            x = x.contiguous(memory_format=memfmt)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out.float(), targets[s])
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    bufs = buffers(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    xe = inputs[steps]
    if memfmt is not None:
        xe = xe.contiguous(memory_format=memfmt)
    with torch.no_grad():
        ev = model(xe).detach().clone()
    ev2 = model(xe).detach().clone()  # eval with grad enabled
    return dict(losses=losses, grads=grads, bufs=bufs, params=params, eval=ev, eval_grad=ev2)


def compare_runs(a, b):
    """max relative errors of run a against run b, per category; also worst tensor name."""
    res = {}
    res["loss"] = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a["losses"], b["losses"]))
    worst = (0.0, None)
    for s, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        if set(ga) != set(gb):
            return {"error": f"grad keys differ {set(ga) ^ set(gb)}"}
        for k in ga:
            e = relerr(ga[k], gb[k])
            if not (e <= worst[0]):
                worst = (e, f"step{s}:{k}")
    res["grad"] = worst
    worst = (0.0, None)
    if set(a["bufs"]) != set(b["bufs"]):
        return {"error": f"buffer keys differ {set(a['bufs']) ^ set(b['bufs'])}"}
    for k in a["bufs"]:
        if "num_batches" in k:
            if not torch.equal(a["bufs"][k], b["bufs"][k]):
                res["nbt"] = f"{k}: {a['bufs'][k].item()} vs {b['bufs'][k].item()}"
            continue
        e = relerr(a["bufs"][k], b["bufs"][k])
        if not (e <= worst[0]):
            worst = (e, k)
    res["buf"] = worst
    worst = (0.0, None)
    for k in a["params"]:
        e = relerr(a["params"][k], b["params"][k])
        if not (e <= worst[0]):
            worst = (e, k)
    res["param"] = worst
    res["eval"] = relerr(a["eval"], b["eval"])
    res["eval_grad"] = relerr(a["eval_grad"], b["eval_grad"])
    return res


def to_bnlab(model, fused=False, example=None, nonfinite="skip"):
    m = copy.deepcopy(model)
    if fused:
        m = bnn.convert(m, example=example, nonfinite=nonfinite)
    else:
        m = bnn.convert(m, nonfinite=nonfinite)
    return m


def count_kinds(model):
    kinds = {}
    for _, m in model.named_modules():
        n = type(m).__module__.split(".")[0] + "." + type(m).__name__
        if "BatchNorm" in n:
            kinds[n] = kinds.get(n, 0) + 1
    return kinds
