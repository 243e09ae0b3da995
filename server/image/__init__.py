"""Provisioned agent images (``edgefleet image build``): see :mod:`server.image.build`.

The verifier that devices run lives in :mod:`agent.image_verify` (standard library only,
so it runs before the agent is installed); it is re-exported here for the operator side.
"""

from agent.image_verify import ImageVerificationError, VerifiedImage, verify_image
from server.image.build import (
    IMAGE_PROFILE_FILES,
    ImageBuildError,
    ImageInfo,
    build_agent_wheel,
    build_image,
    download_wheelhouse,
    image_requirements,
    platform_tags,
    render_template,
)

__all__ = [
    "IMAGE_PROFILE_FILES",
    "ImageBuildError",
    "ImageInfo",
    "ImageVerificationError",
    "VerifiedImage",
    "build_agent_wheel",
    "build_image",
    "download_wheelhouse",
    "image_requirements",
    "platform_tags",
    "render_template",
    "verify_image",
]
