"""The toy world: procedural scenes, their styles and exact metrics (numpy + Pillow only).

Both processes use it: the bot's demo draws references and scores results with it, the
runner pretrains the `toy-sd15` base model on it. It imports no torch.
"""
