"""Write an ArcFace-R50-sized recognition model (InsightFace IResNet-50 layout, random weights) as
ONNX, for timing `raylead bench embed` where no trained R50 is at hand:

    python scripts/make_r50_onnx.py /tmp/r50-random.onnx
    raylead bench embed --images FACES --matcher onnx --model /tmp/r50-random.onnx \
        --detector det_500m.onnx --json bench-embed-r50.json

112×112×3 in, 512-d out, dynamic batch, 43.6 M parameters: the layout and size of
InsightFace's w600k_r50.onnx. Its embeddings mean nothing: use it for throughput only.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin, eps=1e-5),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5),
        )
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.down(x)


class IResNet50(nn.Module):
    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks, cin = [], 64
        for cout, n in ((64, 3), (128, 4), (256, 14), (512, 3)):
            for i in range(n):
                blocks.append(IBasicBlock(cin, cout, 2 if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, dim)
        self.features = nn.BatchNorm1d(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.blocks(self.stem(x)))
        return self.features(self.fc(torch.flatten(x, 1)))


def main(out: str) -> None:
    torch.manual_seed(0)
    model = IResNet50().eval()
    x = torch.randn(2, 3, 112, 112)
    torch.onnx.export(
        model, (x,), out, input_names=["input.1"], output_names=["embedding"],
        dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: IResNet-50, {params / 1e6:.1f} M parameters, 112x112 -> 512, random weights")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_r50_onnx.py OUT.onnx")
    main(sys.argv[1])
