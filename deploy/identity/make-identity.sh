#!/bin/sh
# Makes a trust anchor (a root, 10 years) and an issuer it signs (1 year) for Remora,
# with openssl: P-256 ECDSA keys, the issuer a CA limited to signing proxies'
# certificates. The chart suite runs this very script (tests/install/chart.rs).
#
#   deploy/identity/make-identity.sh [DIR] [TRUST_DOMAIN]
#
# Writes DIR/root.crt (give it to the chart as identity.trustAnchorsPEM), DIR/issuer.crt
# and DIR/issuer.key (identity.issuer.certPEM/keyPEM, or a Secret's tls.crt/tls.key),
# and DIR/root.key: keep that one offline; it signs the next issuer.
set -eu
dir=${1:-.}
domain=${2:-cluster.local}
mkdir -p "$dir"
cd "$dir"
umask 077

openssl ecparam -name prime256v1 -genkey -noout -out root.key
openssl req -x509 -new -key root.key -subj "/CN=root.identity.$domain" -days 3650 \
  -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign \
  -out root.crt

openssl ecparam -name prime256v1 -genkey -noout -out issuer.key
openssl req -new -key issuer.key -subj "/CN=issuer.identity.$domain" -out issuer.csr
printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n' \
  > issuer.ext
openssl x509 -req -in issuer.csr -CA root.crt -CAkey root.key -CAcreateserial \
  -days 365 -extfile issuer.ext -out issuer.crt
rm -f issuer.csr issuer.ext root.srl
chmod 0644 root.crt issuer.crt
echo "wrote $dir/root.crt, $dir/issuer.crt, $dir/issuer.key and $dir/root.key (keep it offline)"
