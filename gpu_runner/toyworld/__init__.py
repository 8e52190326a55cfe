"""`toy-sd15`: Atelier's own small SD1.5-layout base model, pretrained on the toy world."""
