"""Networks only: teachers, students, discriminators, classifiers. Nothing here trains.

Importing the package registers every model class, so `load_model` can rebuild any saved folder.
"""
from . import cgn_mnist  # noqa: F401
from . import students, discriminators  # noqa: F401
from . import classifier  # noqa: F401
from . import domain_net  # noqa: F401
from . import cgn_discriminator  # noqa: F401
from . import imagenet  # noqa: F401  (needs pytorch-pretrained-biggan only when a BigGAN is built)
