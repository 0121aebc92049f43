"""Publishing on the Hugging Face Hub: the model card (`card`, prose in
`model_card_template.md`) and the one-commit push (`push`)."""

from mtnlp.hub.card import model_card, write_model_card
from mtnlp.hub.push import push_to_hub

__all__ = ["model_card", "push_to_hub", "write_model_card"]
