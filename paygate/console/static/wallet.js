// Progressive enhancement: with a browser wallet (EIP-1193), sign the message shown and submit.
// Without JavaScript or a wallet, paste a signature made elsewhere.
(function () {
  var button = document.getElementById("browser-wallet");
  var provider = window.ethereum;
  if (!button || !provider) return;
  button.hidden = false;
  button.addEventListener("click", function () {
    var form = document.getElementById("wallet-form");
    var message = document.getElementById("message").textContent;
    var address = form.elements.address.value;
    provider.request({ method: "personal_sign", params: [message, address] }).then(
      function (signature) {
        document.getElementById("signature").value = signature;
        form.submit();
      },
      function () { button.textContent = "The wallet did not sign"; }
    );
  });
})();
