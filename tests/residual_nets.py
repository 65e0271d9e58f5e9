"""Small residual and concatenating nets for the growth tests (a helper module, not a test file)."""

import torch
import torch.nn.functional as F
from torch import nn


class Basic(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    def __init__(self, w=4, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = nn.Sequential(Basic(w, w), Basic(w, w))
        self.layer2 = nn.Sequential(Basic(w, 2 * w, 2), Basic(2 * w, 2 * w))
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class Dense(nn.Module):
    """DenseNet-style: BN-ReLU-conv layers whose outputs are concatenated to their input."""

    def __init__(self, w=4, growth=3, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1, bias=False)
        c = w
        self.layers = nn.ModuleList()
        for _ in range(3):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(),
                                             nn.Conv2d(c, growth, 3, padding=1, bias=False)))
            c += growth
        self.norm = nn.BatchNorm2d(c)
        self.trans = nn.Conv2d(c, w, 1, bias=False)
        self.fc = nn.Linear(w * 4, classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        x = F.relu(self.trans(F.relu(self.norm(x))))
        x = F.avg_pool2d(x, 4)
        return self.fc(torch.flatten(x, 1))


class Inception(nn.Module):
    def __init__(self, w=4, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(w, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(w, 2, 1), nn.BatchNorm2d(2), nn.ReLU(),
                                nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(w, 2, 1), nn.BatchNorm2d(2),
                                nn.ReLU())
        self.head = nn.Conv2d(9, 5, 1)
        self.fc = nn.Linear(5, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)
        x = F.relu(self.head(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BasicModules(Basic):
    """The same block with ``nn.ReLU`` modules (what SSD scores today) and ``+=``."""

    def __init__(self, cin, cout, stride=1):
        super().__init__(cin, cout, stride)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return self.relu2(out)


class ResNetModules(nn.Module):
    def __init__(self, w=4, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicModules(w, w), BasicModules(w, w))
        self.layer2 = nn.Sequential(BasicModules(w, 2 * w, 2), BasicModules(2 * w, 2 * w))
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        out = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))
