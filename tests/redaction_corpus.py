# ruff: noqa: E501 - corpus lines are real-world tokens, kept whole
"""A labelled corpus for the redact step: sentences with the secret they carry, and look-alikes.

POSITIVES: (detector, text, secret) — ``secret`` must not survive redaction.
NEGATIVES: texts with nothing to redact — they must come out unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

POSITIVES: list[tuple[str, str, str]] = [
    # email
    ("EMAIL", "Contact john.doe@example.com for details", "john.doe@example.com"),
    (
        "EMAIL",
        "mail: Jane_Smith+billing@mail.example.co.uk.",
        "Jane_Smith+billing@mail.example.co.uk",
    ),
    ("EMAIL", "<a href='mailto:x.y-z@sub.domain.io'>", "x.y-z@sub.domain.io"),
    ("EMAIL", "(reach me: o'brien@example.ie)", "brien@example.ie"),
    ("EMAIL", "UPPER@EXAMPLE.ORG wrote:", "UPPER@EXAMPLE.ORG"),
    ("EMAIL", "user123@host-name.example.travel", "user123@host-name.example.travel"),
    # phone
    ("PHONE", "Call me at (415) 555-2671 tomorrow", "(415) 555-2671"),
    ("PHONE", "phone 415-555-2671", "415-555-2671"),
    ("PHONE", "tel 415.555.2671", "415.555.2671"),
    ("PHONE", "US: +1 415 555 2671", "+1 415 555 2671"),
    ("PHONE", "+1-415-555-2671 is the desk", "+1-415-555-2671"),
    ("PHONE", "UK office +44 20 7946 0958", "+44 20 7946 0958"),
    ("PHONE", "Berlin +49 30 12345678", "+49 30 12345678"),
    ("PHONE", "Paris: +33 1 42 68 53 00", "+33 1 42 68 53 00"),
    ("PHONE", "India +91 98765 43210", "+91 98765 43210"),
    ("PHONE", "call 415 555 2671 now", "415 555 2671"),
    # payment cards (Luhn-valid)
    ("CREDIT_CARD", "card 4111111111111111 exp 12/29", "4111111111111111"),
    ("CREDIT_CARD", "Visa 4111 1111 1111 1111", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "MC 5555-5555-5555-4444", "5555-5555-5555-4444"),
    ("CREDIT_CARD", "Amex 3782 822463 10005", "3782 822463 10005"),
    ("CREDIT_CARD", "amex 378282246310005", "378282246310005"),
    ("CREDIT_CARD", "discover 6011 1111 1111 1117", "6011 1111 1111 1117"),
    ("CREDIT_CARD", "JCB 3530111333300000", "3530111333300000"),
    # SSN
    ("US_SSN", "SSN 123-45-6789", "123-45-6789"),
    ("US_SSN", "ssn: 219-09-9999.", "219-09-9999"),
    # IBAN (checksum-valid)
    ("IBAN", "IBAN GB82 WEST 1234 5698 7654 32", "GB82 WEST 1234 5698 7654 32"),
    ("IBAN", "pay to DE89370400440532013000 today", "DE89370400440532013000"),
    ("IBAN", "FR14 2004 1010 0505 0001 3M02 606", "FR14 2004 1010 0505 0001 3M02 606"),
    ("IBAN", "NL91ABNA0417164300", "NL91ABNA0417164300"),
    # IP addresses
    ("IPV4", "client 192.168.1.10 connected", "192.168.1.10"),
    ("IPV4", "from 8.8.8.8:53", "8.8.8.8"),
    ("IPV4", "host=10.0.0.255,", "10.0.0.255"),
    ("IPV6", "addr 2001:db8::ff00:42:8329 up", "2001:db8::ff00:42:8329"),
    ("IPV6", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("IPV6", "link fe80::1ff:fe23:4567:890a%eth0", "fe80::1ff:fe23:4567:890a"),
    # secrets
    (
        "OPENAI_KEY",
        "OPENAI_API_KEY=sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz1234567890",
        "sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz1234567890",
    ),
    (
        "OPENAI_KEY",
        "use sk-abcdefghijklmnopqrstuvwxyzABCDEFGH123456",
        "sk-abcdefghijklmnopqrstuvwxyzABCDEFGH123456",
    ),
    (
        "ANTHROPIC_KEY",
        "key sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcdEFGH",
        "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcdEFGH",
    ),
    ("AWS_ACCESS_KEY_ID", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("AWS_ACCESS_KEY_ID", "temp creds ASIAY34FZKBOKMUTVV7A ok", "ASIAY34FZKBOKMUTVV7A"),
    (
        "AWS_SECRET_KEY",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "AWS_SECRET_KEY",
        'AWS_SECRET_ACCESS_KEY: "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"',
        "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
    ),
    (
        "GITHUB_TOKEN",
        "token ghp_1234567890abcdefghijABCDEFGHIJ123456",
        "ghp_1234567890abcdefghijABCDEFGHIJ123456",
    ),
    (
        "GITHUB_TOKEN",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRS",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRS",
    ),
    (
        "SLACK_TOKEN",
        "slack xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    ),
    (
        "SLACK_WEBHOOK",
        "hook https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
    ),
    (
        "GOOGLE_API_KEY",
        "maps key AIzaSyA1234567890abcdefghijklmnopqrstuv",
        "AIzaSyA1234567890abcdefghijklmnopqrstuv",
    ),
    ("STRIPE_KEY", "stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("STRIPE_KEY", "rk_test_51H8abcdefghijklmnopqrstuv", "rk_test_51H8abcdefghijklmnopqrstuv"),
    (
        "JWT",
        "token eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ),
    (
        "BEARER_TOKEN",
        "Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    ),
    (
        "BEARER_TOKEN",
        "curl -H 'authorization: bearer abc.DEF_ghi-123456789xyz'",
        "abc.DEF_ghi-123456789xyz",
    ),
    (
        "PRIVATE_KEY",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nAbCd+/==\n-----END PRIVATE KEY-----",
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
    ),
    (
        "PRIVATE_KEY",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\n-----END OPENSSH PRIVATE KEY-----",
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU=",
    ),
    ("PASSWORD_ASSIGNMENT", "db password=hunter2!x", "hunter2!x"),
    ("PASSWORD_ASSIGNMENT", 'config {"api_key": "abcd1234efgh"}', "abcd1234efgh"),
    ("PASSWORD_ASSIGNMENT", "PWD: S3cr3t-Pa55", "S3cr3t-Pa55"),
    ("PASSWORD_ASSIGNMENT", "client_secret=xyz987654321", "xyz987654321"),
]

NEGATIVES: list[str] = [
    "Order number 4111 1111 1111 1112 has shipped",  # fails Luhn
    "Invoice 1234567890123456 is due",  # fails Luhn
    "request 123e4567-e89b-12d3-a456-426614174000 done",  # UUID
    "commit 9fceb02d0ae598e95dc970b74dd3f33e6d6aa8c9 fixed it",  # git hash (40 hex)
    "short sha 9fceb02 merged",
    "Python 3.11.7 and pip 23.2.1, torch 2.14.1",  # versions
    "version v1.2.3.4 released",
    "Meeting on 2024-01-15 at 12:30:45 UTC",  # dates, times
    "dated 15/01/2024 and 01.15.2024",
    "Total: $1,234.56 (EUR 1.099,00)",  # prices
    "Ticket JIRA-12345 and INC0012345, case #98765",  # ticket ids
    "Call extension 4567 or room 101",
    "ISBN 978-3-16-148410-0",
    "The ratio is 3.14159 and 2.71828",
    "mac aa:bb:cc:dd:ee:ff",
    "coordinates 48.8584, 2.2945",
    "zip code 94103-1234",
    "serial ABCD-EFGH-IJKL-MNOP",
    "use the sk-learn package",
    "timestamp 1700000000000 ms",
    "port 127.0.0.1:8080",  # loopback is still an IP: kept out of negatives? (see below)
]

# The loopback address is an IP address like any other; it is redacted. Keep NEGATIVES honest.
NEGATIVES.remove("port 127.0.0.1:8080")


# ---------------------------------------------------------------------------------------------
# The grown corpus: every kind of secret in every kind of context, look-alikes in the same
# contexts, and whole records with credentials in structured places. ``score`` runs it through
# a redaction function and reports recall and precision per kind.

#: kind -> [(text carrying the secret, the secret)]. The text may label the value when the kind
#: needs its label (an AWS secret key is only recognisable next to its name).
SECRETS: dict[str, list[tuple[str, str]]] = {
    "EMAIL": [
        ("john.doe@example.com", "john.doe@example.com"),
        ("jane_smith+news@mail.example.co.uk", "jane_smith+news@mail.example.co.uk"),
        ("A.B-C@sub.domain.io", "A.B-C@sub.domain.io"),
        ("x1@ex-ample.travel", "x1@ex-ample.travel"),
    ],
    "PHONE": [
        ("+1 415 555 2671", "415 555 2671"),
        ("+1-415-555-2671", "415-555-2671"),
        ("(415) 555-2671", "555-2671"),
        ("415-555-2671", "415-555-2671"),
        ("415.555.2671", "415.555.2671"),
        ("+44 20 7946 0958", "20 7946 0958"),
        ("+49 30 12345678", "30 12345678"),
        ("+33 1 42 68 53 00", "1 42 68 53 00"),
        ("+91 98765 43210", "98765 43210"),
        ("+81 3-1234-5678", "3-1234-5678"),
        ("+61 2 9374 4000", "2 9374 4000"),
        ("+14155552671", "4155552671"),
        ("+55 11 91234-5678", "91234-5678"),
        ("+44 (0)20 7946 0958", "7946 0958"),
    ],
    "CREDIT_CARD": [
        ("4111111111111111", "4111111111111111"),
        ("4111 1111 1111 1111", "4111 1111 1111 1111"),
        ("5555-5555-5555-4444", "5555-5555-5555-4444"),
        ("3782 822463 10005", "3782 822463 10005"),
        ("6011111111111117", "6011111111111117"),
        ("5105 1051 0510 5100", "5105 1051 0510 5100"),
        ("4222222222222", "4222222222222"),
        ("3056 930902 5904", "3056 930902 5904"),
    ],
    "US_SSN": [
        ("123-45-6789", "123-45-6789"),
        ("219-09-9999", "219-09-9999"),
        ("536-22-8726", "536-22-8726"),
    ],
    "IBAN": [
        ("GB82 WEST 1234 5698 7654 32", "1234 5698 7654"),
        ("DE89370400440532013000", "DE89370400440532013000"),
        ("FR14 2004 1010 0505 0001 3M02 606", "0505 0001 3M02"),
        ("NL91ABNA0417164300", "NL91ABNA0417164300"),
        ("ES9121000418450200051332", "ES9121000418450200051332"),
        ("CH93 0076 2011 6238 5295 7", "6238 5295"),
    ],
    "IPV4": [
        ("192.168.1.10", "192.168.1.10"),
        ("8.8.8.8", "8.8.8.8"),
        ("10.0.0.255", "10.0.0.255"),
        ("203.0.113.7", "203.0.113.7"),
        ("172.16.254.1", "172.16.254.1"),
    ],
    "IPV6": [
        ("2001:db8::ff00:42:8329", "2001:db8::ff00:42:8329"),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
        ("fe80::1ff:fe23:4567:890a", "fe80::1ff:fe23:4567:890a"),
        ("2001:db8::1", "2001:db8::1"),
    ],
    "OPENAI_KEY": [
        (
            "sk-proj-Ab3dEf6hIj9kLmN0pQ_rStUvWx-Yz1234567890T3BlbkFJabcdef",
            "Ab3dEf6hIj9kLmN0pQ_rStUvWx-Yz1234567890T3BlbkFJabcdef",
        ),
        ("sk-abcdefghijklmnopqrstuvwxyzABCDEFGH123456", "abcdefghijklmnopqrstuvwxyzABCDEFGH123456"),
        ("sk-svcacct-0123456789abcdefghijABCDEFGHIJ_-xyz", "0123456789abcdefghijABCDEFGHIJ_-xyz"),
    ],
    "ANTHROPIC_KEY": [
        (
            "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcdEFGH",
            "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcdEFGH",
        ),
        (
            "sk-ant-admin01-ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210",
            "ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210",
        ),
    ],
    "AWS_ACCESS_KEY_ID": [
        ("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("ASIAY34FZKBOKMUTVV7A", "ASIAY34FZKBOKMUTVV7A"),
        ("AKIA2E0A8F3B244C9986", "AKIA2E0A8F3B244C9986"),
    ],
    "AWS_SECRET_KEY": [
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        (
            "AWS_SECRET_ACCESS_KEY=je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
            "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
        ),
        (
            "aws secret key: 9drTJvcXLB89EXAMPLELB8923FB892xMFI+Ab12c",
            "9drTJvcXLB89EXAMPLELB8923FB892xMFI+Ab12c",
        ),
    ],
    "GITHUB_TOKEN": [
        ("ghp_1234567890abcdefghijABCDEFGHIJ123456", "ghp_1234567890abcdefghijABCDEFGHIJ123456"),
        (
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRS",
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRS",
        ),
        ("gho_16C7e42F292c6912E7710c838347Ae178B4a", "16C7e42F292c6912E7710c838347Ae178B4a"),
    ],
    "SLACK_TOKEN": [
        (
            "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
            "1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        ),
        (
            "xoxp-2222222222-3333333333-444444444444-abcdef0123456789",
            "444444444444-abcdef0123456789",
        ),
    ],
    "SLACK_WEBHOOK": [
        (
            "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
            "XXXXXXXXXXXXXXXXXXXXXXXX",
        ),
    ],
    "GOOGLE_API_KEY": [
        ("AIzaSyA1234567890abcdefghijklmnopqrstuv", "SyA1234567890abcdefghijklmnopqrstuv"),
        ("AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"),
    ],
    "STRIPE_KEY": [
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "4eC39HqLyjWDarjtT1zdp7dc"),
        ("rk_test_51H8abcdefghijklmnopqrstuv", "51H8abcdefghijklmnopqrstuv"),
        ("whsec_1234567890abcdefghijABCDEFGHIJ", "1234567890abcdefghijABCDEFGHIJ"),
    ],
    "JWT": [
        (
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
            "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        ),
        (
            "eyJhbGciOiAiSFMyNTYiLCAidHlwIjogIkpXVCJ9.eyJzdWIiOiAidXNlci00MiIsICJleHAiOiAxNzY3MjI1NjAwfQ.BXZoi8nyLF2hZ5aeLOJy3xbnerSa6PVr0cm4AqyYBqM",
            "BXZoi8nyLF2hZ5aeLOJy3xbnerSa6PVr0cm4AqyYBqM",
        ),
    ],
    "BEARER_TOKEN": [
        (
            "Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0",
            "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        ),
        ("bearer abc.DEF_ghi-123456789xyz", "abc.DEF_ghi-123456789xyz"),
        ("Bearer tok3n-9a8b7c6d", "tok3n-9a8b7c6d"),
    ],
    "PRIVATE_KEY": [
        (
            "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nAbCd+/==\n-----END PRIVATE KEY-----",
            "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
        ),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo\n-----END RSA PRIVATE KEY-----",
            "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo",
        ),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\n-----END OPENSSH PRIVATE KEY-----",
            "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU=",
        ),
        (
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBGXk3ZsBCADKq8vTmNpRsT\n=Xy9z\n-----END PGP PRIVATE KEY BLOCK-----",
            "lQOYBGXk3ZsBCADKq8vTmNpRsT",
        ),
    ],
    "PASSWORD_ASSIGNMENT": [
        ("password=hunter2!x", "hunter2!x"),
        ("PWD: S3cr3t-Pa55", "S3cr3t-Pa55"),
        ("client_secret=xyz987654321", "xyz987654321"),
        ("DB_PASSWORD=Tr0ub4dor&3", "Tr0ub4dor"),
        ("SECRET_KEY='django-insecure-8f#k2$x'", "django-insecure-8f#k2$x"),
        ('"api_key": "abcd1234efgh"', "abcd1234efgh"),
        ("postgres://admin:s3cr3tPass@db.example.com:5432/app", "s3cr3tPass"),
        ("my password is Hunter2024", "Hunter2024"),
    ],
    "CREDENTIAL_HEADER": [
        ("Cookie: sessionid=9f8e7d6c5b4a3928; csrftoken=Xy12Ab34Cd56Ef78", "9f8e7d6c5b4a3928"),
        ("Set-Cookie: sid=31d4d96e407aad42; Path=/; Secure; HttpOnly", "31d4d96e407aad42"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("x-api-key: 5f4dcc3b5aa765d61d8327deb882cf99", "5f4dcc3b5aa765d61d8327deb882cf99"),
        ("Proxy-Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l", "YWxhZGRpbjpvcGVuc2VzYW1l"),
    ],
}

#: A second secret where two must be told apart (several cookies, the CVV after a card...).
EXTRA_SECRETS: dict[str, str] = {
    "Cookie: sessionid=9f8e7d6c5b4a3928; csrftoken=Xy12Ab34Cd56Ef78": "Xy12Ab34Cd56Ef78",
}

#: (name, template): every secret (and look-alike) is put in every one of these.
CONTEXTS: list[tuple[str, str]] = [
    ("plain", "my value is {v} ok"),
    ("start", "{v} is what I have"),
    ("end", "what I have is {v}"),
    ("full_stop", "What I have is {v}. Thanks"),
    ("full_stop_eol", "What I have is {v}."),
    ("ellipsis", "it was {v}..."),
    ("comma", "{v}, then more"),
    ("semicolon", "value {v}; next"),
    ("colon", "value: {v}: done"),
    ("exclamation", "it is {v}!"),
    ("question", "is it {v}?"),
    ("parens", "(see {v})"),
    ("brackets", "[{v}]"),
    ("braces", "{{{v}}}"),
    ("angle", "<{v}>"),
    ("double_quotes", 'said "{v}" twice'),
    ("single_quotes", "said '{v}' twice"),
    ("backticks", "run `{v}` now"),
    ("curly_quotes", "said \u201c{v}\u201d twice"),
    ("newlines", "first line\n{v}\nlast line"),
    ("crlf", "first line\r\n{v}\r\n"),
    ("tabs", "col\t{v}\tcol"),
    ("nbsp", "value\u00a0{v}\u00a0here"),
    ("json_escaped_newlines", "first line\\n{v}\\nlast line"),
    ("json_escaped_quotes", '{{\\"value\\": \\"{v}\\"}}'),
    ("json_escaped_tab", "col\\t{v}\\tcol"),
    ("json_in_text", '{{"value": "{v}", "n": 1}}'),
    ("key_equals", "value={v}"),
    ("key_equals_amp", "a=1&value={v}&b=2"),
    ("url_query", "https://example.com/api?q={v}&page=2"),
    ("url_path", "https://example.com/u/{v}/profile"),
    ("key_colon_nospace", "VALUE:{v}"),
    ("yaml", "config:\n  value: {v}\n"),
    ("markdown_bold", "**{v}**"),
    ("markdown_italic", "_{v}_"),
    ("markdown_table", "| name | {v} |"),
    ("html", "<td>{v}</td>"),
    ("cjk", "\u6211\u7684\u662f{v}\u8c22\u8c22"),
    ("fullwidth", "\u503c\uff1a{v}\u3002"),
    ("after_marker", "[REDACTED:EMAIL]{v}"),
    ("after_marker_space", "[REDACTED:EMAIL] {v}"),
    ("before_marker", "{v}[REDACTED:PHONE]"),
    ("hash", "#{v}"),
    ("slash", "a/{v}/b"),
    ("equals_quoted", "value='{v}'"),
    ("dash_bullet", "- {v}\n- other"),
]

#: Contexts left out for a kind: a 40-character AWS secret followed by "/" is the start of a
#: longer base64 string, not a key (base64 has "/"), so "a/<secret>/b" is not one.
UNNATURAL = {("AWS_SECRET_KEY", "url_path"), ("AWS_SECRET_KEY", "slash")}

#: Secrets written next to each other: (separator, first kind, second kind). Every pair of
#: kinds is joined with each separator; both secrets must go.
ADJACENT_SEPARATORS = (" ", ", ", "; ", "/", "\n", " and ", "|")

#: Kinds whose texts may sit directly next to another secret (the others carry a label or are
#: multi-line blocks, which people do not write back to back).
ADJACENT_KINDS = (
    "EMAIL", "PHONE", "CREDIT_CARD", "US_SSN", "IBAN", "IPV4", "IPV6", "OPENAI_KEY",
    "AWS_ACCESS_KEY_ID", "GITHUB_TOKEN", "SLACK_TOKEN", "GOOGLE_API_KEY", "STRIPE_KEY", "JWT",
)  # fmt: skip

#: lookalike kind -> texts that carry nothing to redact.
LOOKALIKES: dict[str, list[str]] = {
    "version": ["version 1.2.3", "v1.2.3.4", "Python 3.11.7", "release 10.4.2.1", "build 1.2.3-beta.4",
                "version 2.0.0.1", "firmware 4.3.2.1", "1.2.3.4-beta", "2.0.0.1+build.5"],
    "order_id": ["order 4111 1111 1111 1112", "PO-2024-000123", "INV-12345678", "order #123456789",
                 "1234567890123456"],
    "isbn": ["ISBN 978-3-16-148410-0", "ISBN-13: 9780306406157", "ISBN 0-306-40615-2"],
    "uuid": ["123e4567-e89b-12d3-a456-426614174000", "018f3a2b-7c4d-7e5f-8a9b-0c1d2e3f4a5b"],
    "timestamp": ["1700000000000", "2024-01-15T12:30:45Z", "12:30:45.123", "1700000000",
                  "2024-01-15 12:30:45+00:00"],
    "hex_hash": ["9fceb02d0ae598e95dc970b74dd3f33e6d6aa8c9", "d41d8cd98f00b204e9800998ecf8427e",
                 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "9fceb02"],
    "price": ["$1,234.56", "EUR 1.099,00", "USD 12,000.00", "\u00a512,000"],
    "date": ["2024-01-15", "15/01/2024", "01.15.2024", "Jan 15, 2024"],
    "ticket": ["JIRA-12345", "INC0012345", "case #98765", "SN-1234"],
    "network_like": ["aa:bb:cc:dd:ee:ff", "00:1A:2B:3C:4D:5E", "1.3.6.1.4.1.311", "999.1.2.3",
                     "192.168.1", "256.300.1.1"],
    "numbers": ["3.14159", "48.8584, 2.2945", "94103-1234", "room 101", "extension 4567", "12:30"],
    "identifiers": ["sk-learn", "task-force-alpha", "gpt-4o-2024-08-06", "claude-3-5-sonnet-20241022",
                    "ABCD-EFGH-IJKL-MNOP", "web-7d9f8b6c5-x2x9z", "@username", "1Z999AA10123456784",
                    "#FF5733", "user@localhost"],
}  # fmt: skip

#: Contexts the look-alikes are put in (a subset: each kind in prose, punctuation, JSON, URLs).
LOOKALIKE_CONTEXTS = (
    "plain", "full_stop", "full_stop_eol", "parens", "double_quotes", "newlines",
    "json_escaped_newlines", "json_escaped_quotes", "key_equals", "url_query", "cjk",
    "after_marker", "markdown_italic",
)  # fmt: skip


def _chat(content: str, **fields: Any) -> dict[str, Any]:
    """A chat record in the JSON rendering (the Dynamo fields plus what a capture adds)."""
    record: dict[str, Any] = {
        "log_type": "audit",
        "ts_ms": 1757115457130,
        "request_id": "req-1",
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o",
        "store": True,
        "metadata": {},
        "input": {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]},
        "output": {"choices": [{"message": {"role": "assistant", "content": "Noted."}}]},
    }
    record.update(fields)
    return record


#: Whole records with credentials in structured places: (kind, name, record, secrets).
RECORDS: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("CREDENTIAL_HEADER", "headers_cookie", _chat("hi", headers={"cookie": "sessionid=4c8e2f1a9b7d"}),
     ["4c8e2f1a9b7d"]),
    ("CREDENTIAL_HEADER", "headers_cookie_capitalised",
     _chat("hi", headers={"Cookie": "theme=dark; sid=77aa88bb99cc"}), ["77aa88bb99cc", "theme=dark"]),
    ("CREDENTIAL_HEADER", "headers_authorization_basic",
     _chat("hi", headers={"authorization": "Basic dXNlcjpwYXNz"}), ["dXNlcjpwYXNz"]),
    ("CREDENTIAL_HEADER", "headers_x_api_key", _chat("hi", headers={"X-Api-Key": "key-0042"}),
     ["key-0042"]),
    ("CREDENTIAL_HEADER", "headers_api_key", _chat("hi", headers={"api-key": "azure0042key"}),
     ["azure0042key"]),
    ("CREDENTIAL_HEADER", "headers_proxy_authorization",
     _chat("hi", headers={"proxy-authorization": "Negotiate YIIB1234"}), ["YIIB1234"]),
    ("CREDENTIAL_HEADER", "headers_set_cookie",
     _chat("hi", headers={"set-cookie": "id=a3fWa; Max-Age=2592000"}), ["a3fWa"]),
    ("CREDENTIAL_HEADER", "metadata_cookie", _chat("hi", metadata={"cookie": "sid=abc"}), ["sid=abc"]),
    ("CREDENTIAL_HEADER", "nested_request_headers",
     _chat("hi", input={"model": "gpt-4o", "messages": [], "request": {"headers": {"Cookie": "s=1x2y3z"}}}),
     ["1x2y3z"]),
    ("CREDENTIAL_HEADER", "extra_headers_authorization",
     _chat("hi", input={"messages": [], "extra_headers": {"Authorization": "Token 0a1b2c3d"}}),
     ["0a1b2c3d"]),
    ("CREDENTIAL_HEADER", "header_pairs",
     _chat("hi", input={"messages": [], "headers": [["Accept", "*/*"], ["Cookie", "sid=pairs42"]]}),
     ["pairs42"]),
    ("CREDENTIAL_HEADER", "har_name_value",
     _chat("hi", input={"log": {"entries": [{"request": {"headers": [
         {"name": "cookie", "value": "JSESSIONID=har0099"}, {"name": "accept", "value": "*/*"}]}}]}}),
     ["har0099"]),
    ("CREDENTIAL_HEADER", "cgi_environ", _chat("hi", input={"environ": {"HTTP_COOKIE": "sid=cgi777"}}),
     ["cgi777"]),
    ("CREDENTIAL_HEADER", "response_set_cookie",
     _chat("hi", output={"headers": {"Set-Cookie": "session=resp123; HttpOnly"}, "body": "ok"}),
     ["resp123"]),
    ("CREDENTIAL_HEADER", "tool_arguments_json",
     _chat("hi", input={"messages": [{"role": "assistant", "tool_calls": [{"function": {
         "name": "http_get", "arguments": '{"url": "https://x.test", "headers": {"Cookie": "sid=tool555"}}'}}]}]}),
     ["tool555"]),
    ("CREDENTIAL_HEADER", "raw_http_in_message",
     _chat("GET /me HTTP/1.1\r\nHost: x.test\r\nCookie: sid=raw31337; lang=en\r\nAccept: */*\r\n\r\n"),
     ["raw31337"]),
    ("PASSWORD_ASSIGNMENT", "json_password_field",
     _chat("hi", input={"messages": [], "tool_args": {"username": "bob", "password": "pa55word!"}}),
     ["pa55word!"]),
    ("PASSWORD_ASSIGNMENT", "json_db_password_field",
     _chat("hi", metadata={"db_password": "metaSecret9"}), ["metaSecret9"]),
]  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One record of the grown corpus: ``secrets`` must go; a look-alike (``secrets`` empty)
    must come out unchanged."""

    kind: str
    context: str
    record: dict[str, Any]
    secrets: tuple[str, ...] = ()
    text: str | None = None  # the message content, for look-alikes

    @property
    def positive(self) -> bool:
        return bool(self.secrets)


def positive_cases() -> Iterator[Case]:
    for kind, values in SECRETS.items():
        for text, secret in values:
            extra = (EXTRA_SECRETS[text],) if text in EXTRA_SECRETS else ()
            for context, template in CONTEXTS:
                if (kind, context) in UNNATURAL:
                    continue
                content = template.format(v=text)
                yield Case(kind, context, _chat(content), (secret, *extra))
    for sep in ADJACENT_SEPARATORS:
        for a in ADJACENT_KINDS:
            for b in ADJACENT_KINDS:
                (ta, sa), (tb, sb) = SECRETS[a][-1], SECRETS[b][0]
                content = f"mine: {ta}{sep}{tb} end"
                yield Case(f"{b}", f"after_{a}{'_' + sep.strip() if sep.strip() else ''}",
                           _chat(content), (sa, sb))  # fmt: skip
    # numbers right after numbers: every value of the digit kinds before every card and phone
    for sep in (" ", ", ", "/", "\n"):
        for a in ("PHONE", "US_SSN", "CREDIT_CARD", "IBAN", "IPV4"):
            for b in ("CREDIT_CARD", "PHONE", "US_SSN"):
                for ta, sa in SECRETS[a]:
                    for tb, sb in SECRETS[b][:3]:
                        content = f"{ta}{sep}{tb}"
                        yield Case(b, f"digits_after_{a}", _chat(content), (sa, sb))
    for kind, name, record, secrets in RECORDS:
        yield Case(kind, name, record, tuple(secrets))


def lookalike_cases() -> Iterator[Case]:
    contexts = dict(CONTEXTS)
    for kind, texts in LOOKALIKES.items():
        for text in texts:
            for context in LOOKALIKE_CONTEXTS:
                content = contexts[context].format(v=text)
                yield Case(kind, context, _chat(content), (), content)
    for text in NEGATIVES:
        yield Case("handwritten", "plain", _chat(text), (), text)


@dataclass
class Tally:
    total: int = 0
    found: int = 0  # positives: secrets removed; look-alikes: records left unchanged
    misses: list[str] = field(default_factory=list)


@dataclass
class Report:
    positives: dict[str, Tally]
    lookalikes: dict[str, Tally]
    false_redactions: int  # markers put into look-alike records

    @property
    def recall(self) -> float:
        total = sum(t.total for t in self.positives.values())
        return sum(t.found for t in self.positives.values()) / max(total, 1)

    @property
    def precision(self) -> float:
        """Correct redactions / all redactions: a marker in a look-alike is a false one."""
        found = sum(t.found for t in self.positives.values())
        return found / max(found + self.false_redactions, 1)

    def misses(self) -> list[str]:
        return [m for t in (*self.positives.values(), *self.lookalikes.values()) for m in t.misses]

    def as_dict(self) -> dict[str, Any]:
        def rate(t: Tally) -> float:
            return round(t.found / max(t.total, 1), 4)

        return {
            "recall": round(self.recall, 4),
            "precision": round(self.precision, 4),
            "secrets": sum(t.total for t in self.positives.values()),
            "lookalike_records": sum(t.total for t in self.lookalikes.values()),
            "false_redactions": self.false_redactions,
            "recall_by_kind": {k: rate(t) for k, t in sorted(self.positives.items())},
            "lookalikes_kept_by_kind": {k: rate(t) for k, t in sorted(self.lookalikes.items())},
        }


def score(redact: Callable[[Sequence[dict[str, Any]]], Sequence[bytes]]) -> Report:
    """Run the corpus through ``redact`` (records in, one JSON text per record out, in order)
    and count per kind: secrets removed, and look-alike records left as they were."""
    positives = list(positive_cases())
    lookalikes = list(lookalike_cases())
    outputs = redact([c.record for c in (*positives, *lookalikes)])
    assert len(outputs) == len(positives) + len(lookalikes), "one output per record"
    by_kind: dict[str, Tally] = {}
    for case, out in zip(positives, outputs, strict=False):
        text = out.decode() if isinstance(out, bytes) else str(out)
        for secret in case.secrets:
            tally = by_kind.setdefault(case.kind, Tally())
            tally.total += 1
            if _survives(secret, text):
                tally.misses.append(f"{case.kind}/{case.context}: {secret!r} survived")
            else:
                tally.found += 1
    kept: dict[str, Tally] = {}
    false = 0
    for case, out in zip(lookalikes, outputs[len(positives) :], strict=True):
        text = out.decode() if isinstance(out, bytes) else str(out)
        tally = kept.setdefault(case.kind, Tally())
        tally.total += 1
        markers = text.count("[REDACTED:") - (case.text or "").count("[REDACTED:")
        if markers or _escaped(case.text or "") not in text:
            false += max(markers, 1)
            tally.misses.append(f"look-alike {case.kind}/{case.context}: {case.text!r} changed")
        else:
            tally.found += 1
    return Report(by_kind, kept, false)


def _escaped(text: str) -> str:
    import orjson

    return orjson.dumps(text).decode()[1:-1]


def _survives(secret: str, output_json: str) -> bool:
    return secret in output_json or _escaped(secret) in output_json


def redact_like_the_cli(
    records: Sequence[dict[str, Any]], pipeline: Any = None, chain: Sequence[Any] | None = None
) -> list[bytes]:
    """The records through the configured chain exactly as `auditpipe redact` runs it (one
    JSONL line in, one out); ``pipeline`` is the ``[pipeline]`` table (None: the defaults),
    ``chain`` a chain of steps to run instead."""
    import io

    import orjson
    from auditpipe.processors import chain_for
    from auditpipe.processors.offline import run_offline

    steps = list(chain) if chain is not None else chain_for(pipeline)
    src = [orjson.dumps(r) + b"\n" for r in records]
    out, rejects = io.BytesIO(), io.BytesIO()
    report = run_offline(steps, src, out, rejects, progress=None)
    if report.rejected or report.written != len(records):
        raise AssertionError(f"corpus records rejected: {rejects.getvalue()[:2000]!r}")
    return out.getvalue().splitlines()
