"""The seed's utilities, kept small: the replay buffer, the paper's LR decay, requires_grad, image conversion, and the
one-line messages of mistakes a user can fix."""

import numpy as np
import torch
from PIL import Image, ImageOps


class ReplayBuffer:
    """The last max_size fakes (Shrivastava et al. 2017): half the time D sees an older fake instead of the new one.

    The fakes live in one preallocated float32 tensor on their device, and the random choices are drawn on the CPU
    before the step (`draw`), so the step itself is fixed tensor work that a CUDA graph can replay."""

    KEEP, STORE, SWAP = 0, 1, 2  # D sees the new fake | the new fake is stored and seen | D sees an old one, replaced

    def __init__(self, max_size=50, seed=0, per_image=1):
        self.max_size, self.n, self.data = max_size, 0, None  # n: slots filled so far
        self.generator = torch.Generator().manual_seed(seed)  # own stream, saved in checkpoints
        self.per_image = per_image  # fakes per input image (--attention: the content and the blend)

    def draw(self, batch_size):
        """The choices for a batch's fakes, (batch_size * per_image, 2) int64 rows of (slot, action), consuming the
        random stream."""
        rows = []
        for _ in range(batch_size * self.per_image):
            if self.n < self.max_size:
                rows.append((self.n, self.STORE))
                self.n += 1
            elif self.max_size and torch.rand(1, generator=self.generator).item() > 0.5:
                rows.append((torch.randint(self.max_size, (1,), generator=self.generator).item(), self.SWAP))
            else:
                rows.append((0, self.KEEP))
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 2)

    def push_and_pop(self, fakes, choices):
        """What D sees for fakes (B, C, H, W), given draw()'s choices (on the fakes' device); stores fakes as chosen."""
        if self.max_size == 0:
            return fakes.detach()
        layout = memory_format_of(fakes)  # D reads what comes out in the networks' layout (channels_last on CUDA)
        if self.data is None:  # rows are written before they are read; untouched pages cost no memory
            self.data = torch.empty(
                (self.max_size, *fakes.shape[1:]), dtype=torch.float32, device=fakes.device, memory_format=layout
            )
        seen = []
        for k in range(len(fakes)):  # in order: two fakes of a batch may pick the same slot
            slot, action = choices[k, :1], choices[k, 1]
            old, new = self.data.index_select(0, slot), fakes[k : k + 1].detach().float()  # (1, C, H, W) each
            seen.append(torch.where(action == self.SWAP, old, new))
            self.data.index_copy_(0, slot, torch.where(action == self.KEEP, old, new))
        return torch.cat(seen).contiguous(memory_format=layout)  # a no-op unless index_select changed the layout

    def state_dict(self):
        rows = [self.data[i : i + 1].to("cpu", memory_format=torch.contiguous_format) for i in range(self.n)]
        return {"data": rows, "generator": self.generator.get_state()}

    def load_state_dict(self, state, device, memory_format=torch.contiguous_format):
        self.n, self.data = len(state["data"]), None
        if state["data"]:
            self.data = torch.empty(
                (self.max_size, *state["data"][0].shape[1:]), device=device, memory_format=memory_format
            )
            self.data[: self.n] = torch.cat(state["data"]).to(device)
        self.generator.set_state(state["generator"])


def memory_format_of(x):
    """channels_last if the 4-D tensor x is laid out so (and not also plain contiguous), else contiguous_format."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def linear_decay(n_epochs, decay_epoch):
    """LR factor of the paper: 1 until decay_epoch, then linearly down to 0 at n_epochs."""
    return lambda epoch: 1.0 - max(0, epoch - decay_epoch) / (n_epochs - decay_epoch)


def set_requires_grad(nets, flag):
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def to_uint8(x):
    """Generator output in [-1, 1] -> uint8, rounded exactly as the seed: 0.5 * (x + 1) written by torchvision's
    save_image, which computes mul(255).add_(0.5).clamp_(0, 255) and truncates."""
    return (0.5 * (x + 1.0)).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def as_image(img, nc=3):
    """load_image's conversion of an opened PIL image, any mode, to RGB (nc=3) or L (nc=1)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:  # 16-bit (PNGs open as I;16 or I): scale, don't clip
            a = a / 257
        elif img.mode == "F" and a.max() <= 1:  # float in [0, 1]
            a = a * 255
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("L" if nc == 1 else "RGB")


def to_tensor(img):
    """PIL image (RGB or L) -> (C, H, W) float tensor in [-1, 1]; the same numbers as torchvision's
    to_tensor * 2 - 1."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).reshape(img.size[1], img.size[0], -1) / 255)
    return x.permute(2, 0, 1).contiguous() * 2 - 1


def tensor2image(x):
    """(C, H, W) in [-1, 1] -> (3, H, W) uint8 for display."""
    x = to_uint8(x.detach().float().cpu())
    return (x.expand(3, -1, -1) if x.shape[0] == 1 else x).numpy()


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback."""


def first_line(e):
    """The first line of an exception's message (its type's name if it has none), for one-line reports."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def cannot_write(folder, e):
    """The one line for an output folder that cannot be made or written (e: the OSError)."""
    return f"cannot write to --output_dir {folder} ({e.strerror or first_line(e)}): pick a folder you can write to"


def channels_problem(args):
    """Why --input_nc / --output_nc cannot work (images are read as gray or RGB only), or None."""
    for flag in ("input_nc", "output_nc"):
        if getattr(args, flag) not in (1, 3):
            return f"--{flag} {getattr(args, flag)}: images are read as gray (1) or RGB (3)"
    if getattr(args, "attention", False) and args.input_nc != args.output_nc:
        return "--attention blends each translation with its input, so it needs --input_nc == --output_nc"
    return None
