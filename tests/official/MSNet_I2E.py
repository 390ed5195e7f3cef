import torch
from .i2e import *
import torch.nn as nn
from spikingjelly.activation_based import neuron, surrogate, layer



def conv3x3(in_planes, out_planes, stride=1):
    return layer.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return layer.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)


def NeuronNode():
    return neuron.LIFNode(surrogate_function=surrogate.ATan(), v_threshold=1.0, v_reset=0.0, detach_reset=True, decay_input=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super(BasicBlock, self).__init__()
        
        self.sn1 = NeuronNode()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = layer.BatchNorm2d(planes)
        
        self.sn2 = NeuronNode()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = layer.BatchNorm2d(planes)
        
        self.downsample = downsample

    def forward(self, x):
        identity = x

        out = self.sn1(x)
        out = self.conv1(out)
        out = self.bn1(out)
        
        out = self.sn2(out)
        out = self.conv2(out)
        out = self.bn2(out)
        
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity

        return out
    

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super(Bottleneck, self).__init__()

        self.sn1 = NeuronNode()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = layer.BatchNorm2d(planes)
        
        self.sn2 = NeuronNode()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = layer.BatchNorm2d(planes)
        
        self.sn3 = NeuronNode()
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = layer.BatchNorm2d(planes * self.expansion)
        
        self.downsample = downsample

    def forward(self, x):
        identity = x

        out = self.sn1(x)
        out = self.conv1(out)
        out = self.bn1(out)
        
        out = self.sn2(out)
        out = self.conv2(out)
        out = self.bn2(out)
        
        out = self.sn3(out)
        out = self.conv3(out)
        out = self.bn3(out)
        
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        
        return out


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, zero_init=False, ratio=0.12, shuffle=[4, 5, 6, 7, 0, 1, 2, 3]):
        super().__init__()
        self.inplanes = 64
        
        self.i2e = I2E(ratio=ratio, shuffle=shuffle)
        self.conv1 = layer.Conv2d(2, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = layer.BatchNorm2d(self.inplanes)
        self.maxpool = layer.MaxPool2d(kernel_size=3, stride=2, padding=1)
        
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        
        self.avgpool = layer.AdaptiveAvgPool2d((1, 1))
        self.sn1 = NeuronNode()
        self.fc = layer.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, layer.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
            elif isinstance(m, layer.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
                
        if zero_init:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                NeuronNode(),
                conv1x1(self.inplanes, planes * block.expansion, stride),
                layer.BatchNorm2d(planes * block.expansion),
            )

        layers = []
        layers.append(block(self.inplanes, planes, stride, downsample))
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))

        return nn.Sequential(*layers)

    def forward(self, imgs):
        x = self.i2e(imgs)
        
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = self.sn1(x)
        if self.avgpool.step_mode == 's':
            x = torch.flatten(x, 1)
        elif self.avgpool.step_mode == 'm':
            x = torch.flatten(x, 2)
        
        x = self.fc(x)

        return x.mean(dim=0)


def resnet18(**kwargs):
    model = ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)
    return model


def resnet34(**kwargs):
    model = ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)
    return model


def resnet50(**kwargs):
    model = ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)
    return model


def resnet101(**kwargs):
    model = ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)
    return model


def resnet152(**kwargs):
    model = ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)
    return model