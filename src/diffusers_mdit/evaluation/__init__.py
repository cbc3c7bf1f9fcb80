from .digits import DigitsClassifier

__all__ = ["DigitsClassifier"]
