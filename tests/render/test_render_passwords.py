"""Install passwords: read from the env mapping, SHA-512 crypt with a derived salt, Windows encoding."""

import base64

import pytest

from packer_assets.render.passwords import (
    ADMIN_SUFFIX,
    USER_SUFFIX,
    PasswordError,
    derive_salt,
    read_password,
    sha512_crypt_hash,
    verify_sha512_crypt,
    windows_decode,
    windows_encode,
)


def test_read_password_names_variable_and_key_but_never_the_value():
    assert read_password({"PW": "x"}, "PW", "k") == "x"
    for env, word in (({}, "unset"), ({"PW": ""}, "empty")):
        with pytest.raises(PasswordError, match=f"k: .*PW is {word}"):
            read_password(env, "PW", "k")
    with pytest.raises(PasswordError) as err:
        read_password({"PW": "sec\x00ret"}, "PW", "k")
    assert "sec" not in str(err.value)


def test_salt_is_stable_and_differs_by_key_password_and_seed():
    salt = derive_salt("debian-12", "pw")
    assert salt == derive_salt("debian-12", "pw") and len(salt) == 16
    assert len({salt, derive_salt("rocky-9", "pw"), derive_salt("debian-12", "pw2"), derive_salt("debian-12", "pw", "site")}) == 4


def test_sha512_crypt_hash_verifies_and_is_reproducible():
    hashed = sha512_crypt_hash("pä$$ wörd", "abcdefgh")
    assert hashed.startswith("$6$rounds=656000$abcdefgh$")
    assert hashed == sha512_crypt_hash("pä$$ wörd", "abcdefgh")
    assert verify_sha512_crypt("pä$$ wörd", hashed) and not verify_sha512_crypt("pä$$ word", hashed)
    with pytest.raises(PasswordError):
        sha512_crypt_hash("pw", "bad salt!")


def test_windows_encoding_matches_microsofts_documented_example():
    # learn.microsoft.com, AdministratorPassword/Value: "pw" encoded with PlainText=false
    assert windows_encode("pw", ADMIN_SUFFIX) == "cAB3AEEAZABtAGkAbgBpAHMAdAByAGEAdABvAHIAUABhAHMAcwB3AG8AcgBkAA=="
    assert base64.b64decode(windows_encode("1234", USER_SUFFIX)).decode("utf-16-le") == "1234Password"
    for password in ("<&\"' :#\\$", "ü😀"):
        assert windows_decode(windows_encode(password, USER_SUFFIX), USER_SUFFIX) == password
    assert windows_decode("not base64!", USER_SUFFIX) is None
    assert windows_decode(windows_encode("x", USER_SUFFIX), ADMIN_SUFFIX) is None


def test_the_native_crypt_agrees_with_the_pure_python_one():
    """The system's crypt_r (used when present) and libpass's builtin backend write the same hash."""
    from passlib.handlers.sha2_crypt import sha512_crypt as reference

    from packer_assets.render import passwords

    assert passwords._NATIVE is not None, "no crypt_r in the system's libcrypt: every Linux has one"
    builtin = reference.using(rounds=1000)  # not 5000: the default, which passlib leaves out of the string
    builtin.set_backend("builtin")
    for password in ("pw", "pä$$ wörd 😀", "x" * 300, " lead\ttab"):
        assert passwords._crypt(password, "saltsalt", 1000) == builtin.using(salt="saltsalt").hash(password)
    full = passwords.sha512_crypt_hash("pä$$ wörd", "abcdefgh")
    assert full == reference.using(salt="abcdefgh", rounds=passwords.CRYPT_ROUNDS).hash("pä$$ wörd")
