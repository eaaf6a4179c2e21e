"""MONAI Deploy: the model repository export (:mod:`.export`, no SDK needed) and the App SDK application
(:mod:`.app`, :mod:`.operators`; needs ``pip install -r requirements-deploy.txt``)."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
