"""Routing requests to adapters. Prompt tags: a text that starts with a tag such as
`<domain=medical>` is served by adapter "medical"; the batch then runs as one mixed batch.

    router = TagRouter(adapters=["finance", "medical"], default="__base__")
    names, texts = router.route(["<domain=medical> What is…", "Hello"])   # ["medical", "__base__"]
    model.generate(**tokenizer(texts, ...), adapter_names=names)

Keeping the tag in the text (`strip=False`) is how the article's "prefix" adapters are trained:
the model sees the tag it was trained with.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

from .mixing import BASE


@dataclass
class TagRouter:
    """Picks an adapter per text from a leading tag."""

    adapters: list[str]  # the adapters a tag may name
    pattern: str = r"^\s*<domain=(?P<name>[\w.-]+)>\s*"  # regex with a group named "name"
    strip: bool = True  # remove the tag from the text the model sees
    default: str = BASE  # adapter for a missing or unknown tag ("__base__": no adapter)
    _regex: re.Pattern = field(init=False, repr=False)

    def __post_init__(self):
        self._regex = re.compile(self.pattern)
        if "name" not in self._regex.groupindex:
            raise ValueError(f"the tag pattern needs a group named 'name', e.g. {TagRouter.pattern!r}")
        if self.default != BASE and self.default not in self.adapters:
            raise ValueError(f"default {self.default!r} is not one of the adapters {self.adapters} (or '{BASE}')")

    def route(self, texts: list[str]) -> tuple[list[str], list[str]]:
        """(adapter name per text, the texts as the model should see them)."""
        names, out = [], []
        for text in texts:
            match = self._regex.match(text)
            name = match.group("name") if match else None
            if name is None:
                warnings.warn(f"no tag in {text[:40]!r}: using {self.default!r}", stacklevel=2)
            elif name not in self.adapters:
                warnings.warn(f"unknown tag {name!r} (adapters: {self.adapters}): using {self.default!r}", stacklevel=2)
            names.append(name if name in self.adapters else self.default)
            out.append(text[match.end():] if match and self.strip else text)
        return names, out
