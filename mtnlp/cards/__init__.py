"""Task cards: a task is data (a YAML card), validated strictly, errors naming file and field."""

from mtnlp.cards.load import check_hierarchy, load_card, load_cards, parse_card
from mtnlp.cards.schema import TaskCard

__all__ = ["TaskCard", "check_hierarchy", "load_card", "load_cards", "parse_card"]
