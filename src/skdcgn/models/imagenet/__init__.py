"""ImageNet track: CGN-ImageNet teachers (BigGAN-deep + U2-Net), their students at 128/256 px, and the
ResNet-50 invariant classifier (`resnet.py`).

Importing this package needs only torch; pytorch-pretrained-biggan (`pip install 'skdcgn[imagenet]'`)
is imported when a BigGAN is built, and its absence is a one-line SkdcgnError then.
"""
from .biggan import (ImageNetMechanism, ImageNetMechanismConfig, load_biggan_folder, load_cgn_imagenet,  # noqa: F401
                     random_cgn, save_biggan_folder, tiny_config, truncate_normal, truncated_noise)
from .u2net import U2Net, U2NetConfig, tiny_u2net_config  # noqa: F401
from .resnet import (HEADS, READOUTS, EnsembleOutput, HeadLogits, InvariantEnsemble, InvariantEnsembleConfig,  # noqa: F401
                     ResNet, ResNetConfig, imagenet_normalize, load_torchvision_resnet, resnet50_config,
                     tiny_resnet_config)
