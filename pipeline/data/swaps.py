"""Hard-negative captions made from a caption's word->object annotation: the relation swapped ("A left of B"
-> "B left of A") or one attribute exchanged between two named objects ("red circle ... blue square" ->
"blue circle ... red square"), each kept only when the annotations show it is false of the image.

Inputs are what the shards carry (the synthetic scenes and Flickr30k Entities-style JSON): the caption's
whitespace words, ``word_objects`` (the object index of each word, -1 for none) and ``objects`` (dicts with
attribute fields such as ``color`` / ``shape`` / ``size``). A relation swap needs exactly two named objects
with words other than a conjunction between them ("a red circle and a blue square" says no relation, and
swapping it keeps it true); strict spatial relations are false when their arguments are exchanged. An
attribute swap is kept when at least one of the objects it names no longer exists in the image.
"""
from __future__ import annotations

from typing import Optional

ATTRIBUTE_FIELDS = ("size", "color", "shape")
CONJUNCTIONS = frozenset({"and", "&", ",", "with", "or", "a", "an", "the"})


def object_spans(word_objects: list[int]) -> dict[int, list[int]]:
    """Word positions per named object, in the order the objects are first named."""
    spans: dict[int, list[int]] = {}
    for position, obj in enumerate(word_objects):
        if obj >= 0:
            spans.setdefault(obj, []).append(position)
    return spans


def _kind(words: list[str], span: list[int], obj: dict) -> tuple:
    """The attribute values a span names: the object's field values that occur among its words."""
    said = {words[p] for p in span}
    return tuple(obj[f] if obj.get(f) in said else None for f in ATTRIBUTE_FIELDS)


def _names_an_object(kind: tuple, objects: list[dict]) -> bool:
    return any(all(v is None or o.get(f) == v for f, v in zip(ATTRIBUTE_FIELDS, kind)) for o in objects)


def relation_swap(words: list[str], word_objects: list[int]) -> Optional[str]:
    """The caption with its two object phrases exchanged, or None when it names no relation of two objects."""
    spans = object_spans(word_objects)
    if len(spans) != 2:
        return None
    first, second = spans.values()
    if first != list(range(first[0], first[-1] + 1)) or second != list(range(second[0], second[-1] + 1)):
        return None
    between = words[first[-1] + 1:second[0]]
    if not between or all(w in CONJUNCTIONS for w in between):
        return None
    a, b = words[first[0]:first[-1] + 1], words[second[0]:second[-1] + 1]
    return " ".join(words[:first[0]] + b + between + a + words[second[-1] + 1:])


def attribute_swaps(words: list[str], word_objects: list[int], objects: list[dict]) -> list[str]:
    """Captions with one attribute word exchanged between two named objects that are false of the image."""
    spans = object_spans(word_objects)
    named = [(obj, span) for obj, span in spans.items() if 0 <= obj < len(objects)]
    out = []
    for i, (a, span_a) in enumerate(named):
        for b, span_b in named[i + 1:]:
            for field in ATTRIBUTE_FIELDS:
                value_a, value_b = objects[a].get(field), objects[b].get(field)
                pos_a = next((p for p in span_a if words[p] == value_a), None)
                pos_b = next((p for p in span_b if words[p] == value_b), None)
                if pos_a is None or pos_b is None or value_a == value_b:
                    continue
                new = list(words)
                new[pos_a], new[pos_b] = value_b, value_a
                kinds = [_kind(new, span_a, {**objects[a], field: value_b}),
                         _kind(new, span_b, {**objects[b], field: value_a})]
                if not all(_names_an_object(k, objects) for k in kinds):
                    out.append(" ".join(new))
    return out


def pick_swap(caption: str, word_objects, objects, choice: int) -> Optional[str]:
    """One swapped caption chosen by the integer ``choice``: the relation swap or an attribute swap with equal
    odds when both exist; None when the annotations allow none (or are malformed)."""
    if not (isinstance(word_objects, list) and isinstance(objects, list)
            and all(isinstance(o, int) for o in word_objects) and all(isinstance(o, dict) for o in objects)):
        return None
    words = caption.split()
    if len(words) != len(word_objects):
        return None
    relation = relation_swap(words, word_objects)
    attributes = attribute_swaps(words, word_objects, objects)
    if relation is not None and (not attributes or choice % 2 == 0):
        return relation
    return attributes[(choice // 2) % len(attributes)] if attributes else None
