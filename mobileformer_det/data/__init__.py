from .datasets import check_datasets, register_datasets_from_config
from .mapper import DetrDatasetMapper
from .toy import ensure_toy_dataset, register_toy_dataset
