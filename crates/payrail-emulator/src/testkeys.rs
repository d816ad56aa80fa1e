//! Fixed **test-only** RSA keys (testdata/test-only-keys/README.md): generating 2048-bit keys is
//! slow in debug builds. Never use them for anything real; they are public.

pub const MERCHANT_PRIVATE_PEM: &str =
    include_str!("../testdata/test-only-keys/merchant-private.pem");
pub const MERCHANT_PUBLIC_PEM: &str =
    include_str!("../testdata/test-only-keys/merchant-public.pem");
pub const CHANNEL_PRIVATE_PEM: &str =
    include_str!("../testdata/test-only-keys/channel-private.pem");
pub const CHANNEL_PUBLIC_PEM: &str = include_str!("../testdata/test-only-keys/channel-public.pem");
/// A 32-byte WeChat APIv3 key for tests.
pub const WECHAT_API_V3_KEY: &str = "payrailTestOnlyApiV3Key000000001";
