#!/usr/bin/env bash
# Make a software TPM (swtpm) state whose EK certificates are issued by a local CA made here,
# for the attestation tests and the demo. Hermetic: it never reads /etc/swtpm-localca.conf or
# writes /var/lib/swtpm-localca. Needs swtpm swtpm-tools tpm2-tools openssl (scripts/setup.sh).
#
#   scripts/make_swtpm_ek_state.sh OUTDIR
#
# OUTDIR/state/          the TPM state: EKs RSA-2048 (cert NV 0x01c00002, key 0x81010001),
#                        ECC P-384 (0x01c00016, 0x81010016) and ECC P-256 (0x01c0000a, 0x81010002)
# OUTDIR/ek-ca-chain.pem the issuing intermediate + the local root: what a verifier trusts
# OUTDIR/ca/             the CA (root and intermediate keys: test material only)
# A free loopback port pair (server, ctrl = server + 1) is used briefly to add the P-256 EK:
# swtpm_setup 0.7 makes only RSA-2048 and P-384 EKs.
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUTDIR}")
free_pair() {  # a port P with P and P+1 both free a moment ago
  python3 - <<'PY'
import socket
for _ in range(100):
    with socket.socket() as a:
        a.bind(("127.0.0.1", 0))
        port = a.getsockname()[1]
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
    print(port)
    break
PY
}
for tool in swtpm swtpm_setup swtpm_localca swtpm_ioctl tpm2_createek openssl; do
  command -v "$tool" >/dev/null || { echo "$tool missing: run scripts/setup.sh" >&2; exit 1; }
done
rm -rf "$out"; mkdir -p "$out"/{conf,ca,state,certs}

printf 'statedir = %s\nsigningkey = %s\nissuercert = %s\ncertserial = %s\n' \
  "$out/ca" "$out/ca/signkey.pem" "$out/ca/issuercert.pem" "$out/ca/certserial" \
  > "$out/conf/swtpm-localca.conf"
printf -- '--platform-manufacturer paygate-test\n--platform-version 2.1\n--platform-model swtpm\n' \
  > "$out/conf/swtpm-localca.options"
printf 'create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n' \
  "$(command -v swtpm_localca)" "$out/conf/swtpm-localca.conf" "$out/conf/swtpm-localca.options" \
  > "$out/conf/swtpm_setup.conf"

swtpm_setup --tpm2 --tpmstate "$out/state" --config "$out/conf/swtpm_setup.conf" \
  --create-ek-cert --create-platform-cert --write-ek-cert-files "$out/certs" \
  --overwrite --logfile "$out/swtpm_setup.log" >/dev/null

# Add the TCG default P-256 EK (template L-2) and a certificate for it from the same CA.
# Another process may take the port between the check and swtpm's bind: try a few pairs.
for _ in 1 2 3 4 5; do
  port=$(free_pair)
  swtpm socket --tpm2 --tpmstate dir="$out/state" \
    --server type=tcp,port="$port",bindaddr=127.0.0.1 --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 \
    --flags not-need-init,startup-clear --daemon --pid file="$out/swtpm.pid" 2>>"$out/swtpm.log" && break
  port=
done
[[ -n $port ]] || { echo "swtpm did not start: $(tail -3 "$out/swtpm.log")" >&2; exit 1; }
export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$port" TSS2_LOG=all+none
trap 'swtpm_ioctl --tcp 127.0.0.1:$((port + 1)) -s >/dev/null 2>&1 || true; rm -f "$out/swtpm.pid"' EXIT
for _ in $(seq 100); do tpm2_getcap properties-fixed >/dev/null 2>&1 && break; sleep 0.05; done
tpm2_createek -c "$out/ek256.ctx" -G ecc -u "$out/ek256.pub" >/dev/null
tpm2_readpublic -c "$out/ek256.ctx" -f pem -o "$out/certs/ek-p256-pub.pem" >/dev/null
tpm2_evictcontrol -C o -c "$out/ek256.ctx" 0x81010002 >/dev/null
tpm2_flushcontext -t   # no resource manager: free the transient slots
xy=$(openssl ec -pubin -in "$out/certs/ek-p256-pub.pem" -outform der 2>/dev/null | tail -c 64 | od -An -tx1 -v | tr -d ' \n')
mkdir -p "$out/p256"
swtpm_localca --type ek --ek "x=${xy:0:64},y=${xy:64:64},id=secp256r1" --dir "$out/p256" --tpm2 \
  --tpm-spec-family 2.0 --tpm-spec-level 0 --tpm-spec-revision 164 \
  --tpm-manufacturer id:00001014 --tpm-model swtpm --tpm-version id:20191023 \
  --configfile "$out/conf/swtpm-localca.conf" --optsfile "$out/conf/swtpm-localca.options" >/dev/null
mv "$out/p256/ek.cert" "$out/certs/ek-p256.crt"; rmdir "$out/p256"
tpm2_nvdefine 0x01c0000a -C p -s "$(stat -c %s "$out/certs/ek-p256.crt")" \
  -a "ppwrite|writedefine|ppread|ownerread|authread|no_da|platformcreate" >/dev/null
tpm2_nvwrite 0x01c0000a -C p -i "$out/certs/ek-p256.crt"
tpm2_nvwritelock 0x01c0000a -C p
rm -f "$out/ek256.ctx" "$out/ek256.pub"
tpm2_shutdown   # orderly: the state is saved when swtpm stops (trap)

cat "$out/ca/issuercert.pem" "$out/ca/swtpm-localca-rootca-cert.pem" > "$out/ek-ca-chain.pem"
for cert in "$out"/certs/*.crt; do
  openssl x509 -inform der -in "$cert" -out "${cert%.crt}.pem"
  openssl verify -CAfile "$out/ca/swtpm-localca-rootca-cert.pem" -untrusted "$out/ca/issuercert.pem" \
    "${cert%.crt}.pem" >/dev/null
done
echo "$out"
