"""Image-level protection: cloak a subject's photos before posting (RID, ASPL, FSMG, AdvDM, PhotoGuard).

    from noclone.cloak import get_cloak, protect_folder
    cloak = get_cloak("aspl", model="sandbox")          # or "rid" (no model needed), "fsmg", "advdm", "photoguard"
    protected = cloak.protect(pil_images)                # same sizes, |out - in| <= budget (8/255 by default)
"""

from noclone.cloak.base import Cloak, CloakConfig, parse_budget
from noclone.cloak.registry import cloak_methods, get_cloak, protect_folder

__all__ = ["Cloak", "CloakConfig", "cloak_methods", "get_cloak", "parse_budget", "protect_folder"]
