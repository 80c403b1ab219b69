"""Today's small detectors beside MF-DETR: the published configurations (:data:`PEERS`, built from
``transformers`` and torchvision, ``pip install -e ".[bench]"``) and :class:`PeerDETR`, the
Detectron2 meta architecture that trains and evaluates the DETRs among them through this
project's trainer. Importing this package imports neither library."""
from .detector import PeerDETR
from .zoo import PEERS, Peer, build_network, build_peer, recipe_overrides

__all__ = ["PEERS", "Peer", "PeerDETR", "build_network", "build_peer", "recipe_overrides"]
