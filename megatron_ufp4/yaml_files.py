"""Reading YAML (config and study files, override values): ``yaml.safe_load``'s rules (no code
runs), and a repeated mapping key is an error."""
from __future__ import annotations

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no code runs) that refuses a mapping with a repeated key: plain
    YAML keeps the last one and silently loses the first."""


def _unique_mapping(loader: _UniqueKeyLoader, node, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            repeated = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"repeated key {key!r}", key_node.start_mark)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def yaml_load(text: str):
    """YAML as ``yaml.safe_load`` reads it, but a repeated mapping key is an error (every config
    and study file, every override value)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass: no code runs)
