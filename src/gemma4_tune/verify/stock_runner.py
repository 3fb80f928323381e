"""Load artefacts the way a user without gemma4-tune does, and write their logits.

Standalone: it never imports gemma4_tune (run it with ``python -P`` so this folder is not
on sys.path). Usage: stock_runner.py REQUEST.json, where the request names the base model,
an optional adapter and merged checkpoint, a batch file (torch.save of a dict of tensors)
and the output file. Output (torch.save): logits of each artefact on the batch.
"""

import json
import sys

import torch
from transformers import Gemma4ForConditionalGeneration


def main() -> None:
    request = json.loads(open(sys.argv[1]).read())
    batch = torch.load(request["batch"])
    dtype = getattr(torch, request.get("dtype", "float32"))
    out = {"imported_gemma4_tune": False}
    with torch.no_grad():
        base = Gemma4ForConditionalGeneration.from_pretrained(request["base"], dtype=dtype).eval()
        out["base"] = base(**batch).logits.float()
        if request.get("adapter"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, request["adapter"]).eval()
            out["peft"] = model(**batch).logits.float()
            del model
        if request.get("merged"):
            merged, info = Gemma4ForConditionalGeneration.from_pretrained(request["merged"], dtype=dtype,
                                                                          output_loading_info=True)
            out["transformers"] = merged.eval()(**batch).logits.float()
            out["merged_loading_info"] = {k: sorted(map(str, v)) for k, v in info.items()}
    out["imported_gemma4_tune"] = "gemma4_tune" in sys.modules
    torch.save(out, request["out"])


if __name__ == "__main__":
    main()
