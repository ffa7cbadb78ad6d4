"""Train through the Gundam encoder: a tiny byte-level decoder learns to read the overfit set's images.

    python examples/train_overfit.py                          # renders the overfit set into a temp dir; CPU
    python examples/train_overfit.py --data DIR --images 3 --steps 150 --json
    python examples/train_overfit.py --family ocr2               # DeepSeek-OCR 2's encoder (DeepEncoder V2)

Each image's packed vision tokens (crops' rows, global rows, each row ending in `image_newline`, then
`view_seperator`: the vendor's order, as `EncoderOutput.split()` gives them; DeepSeek-OCR 2's encoder,
`--family ocr2`: the crops' query tokens, the global view's, then `view_seperator`) are the prefix of a causal
sequence, followed by the prompt's and the answer's bytes. The loss is cross-entropy on the answer bytes; the
encoder and the decoder are trained together with AdamW. `swap_loss` evaluates every answer after another
image's vision tokens: far above the final loss, it shows the decoder reads the image, not just the text.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gundam import GundamEncoder
from gundam.encoder import resolve_backend
from gundam.config import (MODES, ClipConfig, EncoderConfig, Mode, Ocr2Config, ProjectorConfig, Qwen2Config,
                           SamConfig, resolve_mode)
from gundam.data import GundamDataset, ViewBudgetSampler, collate

IMAGE = "<image>"   # the prompt's placeholder for the vision tokens; they go first, so it is dropped


FAMILIES = {"ocr": "deepseek-ocr", "ocr2": "deepseek-ocr2"}     # --family: DeepEncoder, DeepEncoder V2
SMALL_SAM = SamConfig(img_size=256, embed_dim=64, depth=3, num_heads=4, window_size=8, global_attn_indexes=(1,),
                      out_chans=64, net_2_chans=96, net_3_chans=128)


def small_encoder_config(family: str = "deepseek-ocr", mode: Mode | None = None) -> EncoderConfig | Ocr2Config:
    """The encoder's structure at a size that trains on a CPU. DeepSeek-OCR: window and global SAM blocks,
    padded windows, CLIP on SAM's output, the projector. DeepSeek-OCR 2: the same SAM, a 2-layer GQA Qwen2
    with one learned query table per view size of `mode` (default 256,192; the encoder takes those two sizes
    only)."""
    mode = mode or parse_mode("256,192", family)
    if family == "deepseek-ocr2":
        return Ocr2Config(
            sam=SMALL_SAM,
            qwen2=Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=256),
            projector=ProjectorConfig(input_dim=128, n_embed=256), base_size=mode.base_size,
            image_size=mode.image_size)
    return EncoderConfig(
        sam=SMALL_SAM,
        clip=ClipConfig(hidden_size=128, num_layers=2, num_attention_heads=4, ffn_hidden_size=256, image_size=56,
                        patch_size=14),
        projector=ProjectorConfig(input_dim=256, n_embed=256),
    )


# ----------------------------------------------------------------------------------------------------------
# the decoder: nanoGPT-style, bytes in, bytes out, vision tokens as a prefix

@dataclass
class DecoderConfig:
    vision_dim: int         # the encoder's n_embed
    max_len: int            # longest sequence: vision tokens + prompt bytes + answer bytes
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        d = cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)              # [B, heads, L, d]
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp(self.ln2(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = nn.Linear(cfg.vision_dim, cfg.d_model)    # vision tokens -> decoder width
        self.byte = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256)

    def loss(self, visions: list[torch.Tensor], prompts: list[bytes], answers: list[bytes]) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over all answer bytes, and their number. visions[i]: [tokens_i, vision_dim].
        One sequence at a time: lengths differ a lot (a receipt's answer is 10x a sign's), padding would waste
        most of the attention."""
        dev, dt = self.head.weight.device, self.head.weight.dtype
        total, count = 0.0, 0
        for vis, prompt, answer in zip(visions, prompts, answers):
            text = torch.tensor(list(prompt + answer), dtype=torch.long, device=dev)
            x = torch.cat([self.vision(vis.to(dev, dt)), self.byte(text)])            # [L, d]
            L = x.shape[0]
            if L > self.cfg.max_len:
                raise ValueError(f"sequence of {L} tokens: the decoder was built for at most {self.cfg.max_len}")
            x = (x + self.pos.weight[:L])[None]                                         # [1, L, d]
            for block in self.blocks:
                x = block(x)
            # position j predicts element j + 1: the answer bytes are predicted from the positions before them
            logits = self.head(self.ln_f(x[0, L - len(answer) - 1:-1]))                 # [len(answer), 256]
            total = total + F.cross_entropy(logits.float(), text[len(prompt):], reduction="sum")
            count += len(answer)
        return total, count


def text_of(record) -> tuple[bytes, bytes]:
    """(prompt bytes without the image placeholder, answer bytes)."""
    return record.prompt.replace(IMAGE, "").encode(), record.answer.encode()


def decoder_loss(decoder: Decoder, visions, records) -> tuple[torch.Tensor, int]:
    prompts, answers = zip(*(text_of(r) for r in records))
    return decoder.loss(visions, prompts, answers)


# ----------------------------------------------------------------------------------------------------------
# data

class Cached(Dataset):
    """Each example decoded once (per worker): the overfit set never changes between epochs. A real training
    run has augmentation or more data than memory, and drops this."""

    def __init__(self, dataset: GundamDataset):
        self.dataset, self.examples = dataset, {}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if i not in self.examples:
            self.examples[i] = self.dataset[i]
        return self.examples[i]


def batches_forever(loader: DataLoader, sampler: ViewBudgetSampler):
    """RecordBatches, epoch after epoch, a new shuffle each epoch."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def parse_mode(text: str, family: str = "deepseek-ocr") -> Mode:
    """A mode name, or custom view sizes "BASE,CROP" (crop mode on, `family`'s cropping rules), e.g. "256,192"."""
    if text in MODES:
        return MODES[text]
    try:
        base, crop = (int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--mode {text!r}: expected a mode name ({', '.join(MODES)}) or BASE,CROP view sizes "
                         f"in px such as 256,192") from None
    if family == "deepseek-ocr2":
        return replace(MODES["ocr2"], base_size=base, image_size=crop)
    return Mode(base, crop, True)


# ----------------------------------------------------------------------------------------------------------
# training

def build_encoder(args, device) -> tuple[GundamEncoder, Mode]:
    """The encoder (from --weights, whose keys give its family, or small and random of --family) and the mode
    its views come in: --mode, else the checkpoint encoder's own or 256,192."""
    torch.manual_seed(args.seed)
    if args.weights:
        encoder = GundamEncoder.from_pretrained(args.weights, device=device, backend=args.backend).train()
        mode = encoder.mode if args.mode is None else parse_mode(args.mode, encoder.family)
    else:
        family = FAMILIES[args.family]
        mode = parse_mode(args.mode or "256,192", family)
        encoder = GundamEncoder(small_encoder_config(family, mode), backend=args.backend).to(device)
    mode = resolve_mode(mode, args.max_crops)
    encoder.check_mode(mode)
    if args.checkpointing:
        encoder.gradient_checkpointing_enable()   # each SAM block and CLIP / Qwen2 layer recomputed in the backward
    return encoder, mode


def build_decoder(encoder: GundamEncoder, dataset: GundamDataset, device) -> Decoder:
    # any image's tokens with any text: the swap loss pairs answers with other images
    max_len = max(lay.tokens for lay in dataset.layouts) + max(sum(map(len, text_of(r))) for r in dataset.records)
    return Decoder(DecoderConfig(encoder.config.projector.n_embed, max_len)).to(device)


def step_loss(encoder: GundamEncoder, decoder: Decoder, rb, device) -> torch.Tensor:
    """Mean cross-entropy per answer byte of one RecordBatch."""
    out = encoder(rb.to(device).batch)
    total, n = decoder_loss(decoder, out.split(), rb.records)
    return total / n


@torch.no_grad()
def evaluate(encoder, decoder, loader, device) -> tuple[float, float | None]:
    """(loss, swap loss) per answer byte over every batch of `loader`; the swap pairs answer i with image
    i+1's vision tokens."""
    visions, records = [], []
    for rb in loader:
        visions += encoder(rb.to(device).batch).split()
        records += rb.records
    loss, n = decoder_loss(decoder, visions, records)
    swap = None
    if len(records) > 1:
        swap_total, _ = decoder_loss(decoder, visions[1:] + visions[:1], records)
        swap = swap_total.item() / n
    return loss.item() / n, swap


def train(args, emit=print) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend == "triton":   # before anything runs: on CPU the kernels need Triton's interpreter
        try:
            resolve_backend(args.backend, device)
        except RuntimeError as e:
            raise ValueError(f"--backend triton: {e}") from None
    encoder, mode = build_encoder(args, device)
    data_dir = args.data
    if data_dir is None:
        from gundam.data.overfit import make_overfit_set
        data_dir = tempfile.mkdtemp(prefix="gundam-overfit-")
        t0 = time.perf_counter()
        make_overfit_set(data_dir, seed=args.seed, n=args.images or 10)
        print(f"rendered the overfit set into {data_dir} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    dataset = GundamDataset.from_jsonl(os.path.join(data_dir, "records.jsonl"), mode, limit=args.images)
    cached = Cached(dataset)
    sampler = ViewBudgetSampler(dataset.views, args.views, seed=args.seed)
    loader = DataLoader(cached, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    eval_loader = DataLoader(cached, batch_sampler=ViewBudgetSampler(dataset.views, args.views, shuffle=False),
                             collate_fn=collate)
    decoder = build_decoder(encoder, dataset, device)
    params = list(encoder.parameters()) + list(decoder.parameters())
    encoder_lr = args.lr if args.encoder_lr is None else args.encoder_lr
    optimizer = torch.optim.AdamW([{"params": list(encoder.parameters()), "lr": encoder_lr},
                                   {"params": list(decoder.parameters()), "lr": args.lr}], weight_decay=0.0)
    n_enc, n_dec = (sum(p.numel() for p in m.parameters()) for m in (encoder, decoder))
    crops = f"{mode.image_size} px crops" if mode.crop_mode else "no crops"
    print(f"{len(dataset)} images: {mode.base_size} px global views, {crops}; "
          f"{len(sampler)} batches of <= {args.views} views per epoch; encoder ({encoder.family}) "
          f"{n_enc / 1e6:.2f}M params, decoder {n_dec / 1e6:.2f}M; {device}, backend {args.backend}", file=sys.stderr)

    initial, _ = evaluate(encoder, decoder, eval_loader, device)
    batches = batches_forever(loader, sampler)
    bar = tqdm(range(1, args.steps + 1), file=sys.stderr, disable=args.steps < 2)
    for step in bar:
        loss = step_loss(encoder, decoder, next(batches), device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if args.json and (step % args.log_every == 0 or step in (1, args.steps)):
            emit(json.dumps({"step": step, "loss": loss.item()}))
    final, swap = evaluate(encoder, decoder, eval_loader, device)
    result = {"initial_loss": initial, "final_loss": final, "swap_loss": swap}
    if args.json:
        emit(json.dumps(result))
    else:
        emit(f"loss per answer byte: {initial:.4f} -> {final:.4f} ({initial / final:.0f}x lower) in {args.steps} steps")
        if swap is not None:
            emit(f"swap loss (each answer after another image's vision tokens): {swap:.4f} "
                 f"({swap / final:.0f}x the final loss)")
    if args.out:
        save(args.out, encoder, decoder)
        print(f"wrote {args.out}/encoder.safetensors and {args.out}/decoder.safetensors", file=sys.stderr)
    return result


def save(out_dir, encoder: GundamEncoder, decoder: Decoder):
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    # encoder keys are the vendor's: GundamEncoder.from_pretrained(path, config=...) loads the file
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, os.path.join(out_dir, "encoder.safetensors"),
              metadata={"config": json.dumps(asdict(encoder.config))})
    save_file(decoder.state_dict(), os.path.join(out_dir, "decoder.safetensors"),
              metadata={"config": json.dumps(asdict(decoder.cfg))})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="directory with records.jsonl (default: render the overfit set into a temp dir)")
    p.add_argument("--images", type=int, default=None, help="train on the first N records (default: all)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--mode", default=None, help="a mode name (e.g. gundam) or BASE,CROP view sizes in px (default "
                                                 "256,192: small views, so it runs on a CPU; with --weights, the "
                                                 "checkpoint encoder's mode)")
    p.add_argument("--max-crops", type=int, default=None, help="2..9 (default 6)")
    p.add_argument("--family", default="ocr", choices=list(FAMILIES),
                   help="the small random encoder's: DeepSeek-OCR's (ocr) or DeepSeek-OCR 2's (ocr2)")
    p.add_argument("--weights", help="start from a DeepSeek-OCR or DeepSeek-OCR 2 checkpoint instead of a small "
                                     "random encoder (its family from its keys)")
    p.add_argument("--backend", default="torch", choices=["auto", "torch", "triton"])
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute each SAM block and CLIP / Qwen2 layer in the backward pass (less memory, more "
                        "time)")
    p.add_argument("--lr", type=float, default=5e-3, help="decoder learning rate")
    p.add_argument("--encoder-lr", type=float, default=None, help="encoder learning rate (default: --lr; use far "
                                                                   "less with --weights)")
    p.add_argument("--views", type=int, default=16, help="view budget per batch: images are batched until their "
                                                          "views (1 + crops each) would pass it (default 16)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="steps between --json lines")
    p.add_argument("--json", action="store_true", help='one {"step", "loss"} line per logged step, then '
                                                       '{"initial_loss", "final_loss", "swap_loss"}')
    p.add_argument("--out", help="directory for encoder.safetensors and decoder.safetensors")
    args = p.parse_args(argv)
    for name in ("steps", "log_every", "images", "views"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
