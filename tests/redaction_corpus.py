# ruff: noqa: E501 - corpus lines are real-world tokens, kept whole
"""A labelled corpus for the redact step: sentences with the secret they carry, and look-alikes.

POSITIVES: (detector, text, secret) — ``secret`` must not survive redaction.
NEGATIVES: texts with nothing to redact — they must come out unchanged.
"""

from __future__ import annotations

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
