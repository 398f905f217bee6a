"""``asyncllm.image_inputs`` on its own: data URLs, the fetch policy's host matching, and the limits."""

from __future__ import annotations

import base64

import pytest

from asyncllm.image_inputs import ImageFetchPolicy, ImageLimits, ImageURL, decode_data_url, read_image_url

from .._images import png_bytes

POLICY = ImageFetchPolicy()


def test_a_base64_data_url_decodes_to_its_bytes() -> None:
    data = png_bytes()
    text = base64.b64encode(data).decode()
    assert decode_data_url(f"data:image/png;base64,{text}", "f", 10**6) == data
    # parameters before base64, upper-case media type, and line breaks inside the payload are accepted
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert decode_data_url(f"data:IMAGE/PNG;name=x.png;base64,{wrapped}", "f", 10**6) == data


@pytest.mark.parametrize(("url", "words"), [
    ("data:image/png;base64", "not a valid data URL"),
    ("data:;base64,AAAA", "must be image/*, got 'none'"),
    ("data:application/octet-stream;base64,AAAA", "must be image/*"),
    ("data:image/png,AAAA", "must be base64-encoded"),
    ("data:image/png;base64,AAA", "not valid base64"),
    ("data:image/png;base64,AA-_", "not valid base64"),
    ("data:image/png;base64,", "holds no bytes"),
    ("data:image/png;base64," + "A" * 20, "over max_image_bytes=12"),
])
def test_bad_data_urls_are_value_errors_naming_the_field(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=r"^the\.field: ") as error:
        decode_data_url(url, "the.field", 12)
    assert words in str(error.value)


def test_only_allowed_hosts_are_fetched() -> None:
    policy = ImageFetchPolicy(allowed_hosts=("Images.Example.com",))
    assert policy.allows("https://images.example.com/a.png")
    assert policy.allows("http://IMAGES.example.com:8080/a.png")  # any port, case-insensitive
    assert not policy.allows("https://example.com/a.png")
    assert not policy.allows("https://images.example.com.evil.test/a.png")
    assert not policy.allows("ftp://images.example.com/a.png")
    assert not POLICY.allows("https://images.example.com/a.png")  # nothing is allowed by default
    for url, words in (("https://images.example.com/a.png", "not allowed"), ("file:///etc/passwd", "scheme 'file'"),
                       ("cat.png", "scheme 'none'")):
        with pytest.raises(ValueError, match=r"^m\.u: ") as error:
            read_image_url(ImageURL(url, "m.u"), POLICY)
        assert words in str(error.value)


@pytest.mark.parametrize(("options", "field"), [
    ({"allowed_hosts": ("",)}, "allowed_image_hosts"), ({"allowed_hosts": (" a",)}, "allowed_image_hosts"),
    ({"timeout": float("inf")}, "image_fetch_timeout"), ({"timeout": -1.0}, "image_fetch_timeout"),
    ({"max_bytes": 0}, "max_image_bytes"), ({"max_bytes": True}, "max_image_bytes"),
])
def test_fetch_policies_are_validated(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        ImageFetchPolicy(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("options", [{"max_images": 0, "max_pixels": 1}, {"max_images": 1, "max_pixels": 1.5}])
def test_image_limits_are_validated(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be an int >= 1"):
        ImageLimits(**options)  # type: ignore[arg-type]
