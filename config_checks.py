"""Config values that only a library's own parser can check (config.py's validation calls these): a value the
library would reject later, or silently misread, fails when the config is built, in one line."""
from errors import ConfigError


def check_auto_augment(policy: str, img_size: int) -> None:
    """AUG.AUTO_AUGMENT through timm's parsers, chosen as timm's create_transform chooses them ('rand...',
    'augmix...', else an AutoAugment policy such as 'original' or 'v0'); '' and 'none' mean off."""
    if policy in ('', 'none'):
        return
    from timm.data import auto_augment as aa  # imported here: only configs that use a policy pay for it
    build = (aa.rand_augment_transform if policy.startswith('rand') else
             aa.augment_and_mix_transform if policy.startswith('augmix') else aa.auto_augment_transform)
    try:
        build(policy, dict(translate_const=int(img_size * 0.45), img_mean=(124, 116, 104)))
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:  # timm asserts on unknown sections
        raise ConfigError(f"AUG.AUTO_AUGMENT {policy!r} is not a timm augmentation policy ({str(e) or 'bad name'}); "
                          f"e.g. 'rand-m9-mstd0.5-inc1', 'original', 'v0', 'augmix-m5-w3', or 'none'") from None
