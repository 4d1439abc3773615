"""Held-out bits of prior_faces_cond with each held-out map's class, with the other class, and with
the learned null class (unconditional); the same evaluation as kepler prior eval."""
import json, sys
import torch
from kepler.data import held_out_set
from kepler.models.load import load_model, load_prior_tokenizer
from kepler.train.codes import class_labels, encode_dataset
from kepler.train.prior_eval import held_out_bits

checkpoint = sys.argv[1]
loaded = load_model(checkpoint, "cpu", kind="prior")
prior = loaded.model
tokenizer = load_prior_tokenizer(loaded, "cpu")
data = loaded.config["data"]
val_set = held_out_set(data)
labels = class_labels(val_set, prior.num_classes, "data.val")
codes, encoded = encode_dataset(tokenizer, val_set, 32, torch.device("cpu"))
labels = labels[encoded]
positions = prior.layout.positions
out = {"weights": loaded.weights, "step": loaded.step, "maps": len(codes), "null_class": prior.null_class}
for name, given in (("own class", labels), ("other class", 1 - labels),
                    ("null class (unconditional)", torch.full_like(labels, prior.null_class))):
    bits = held_out_bits(prior, codes, 32, torch.device("cpu"), given)
    out[name] = {"bits_per_token": bits["bits_per_token"], "bits_per_image": bits["bits_per_position"] * positions}
    for c in (0, 1):
        keep = labels == c
        sub = held_out_bits(prior, codes[keep], 32, torch.device("cpu"), given[keep])
        out[name][f"bits_per_image_class{c}"] = sub["bits_per_position"] * positions
print(json.dumps(out, indent=1))
