(function(){
  var rep=document.getElementById('f-replicated'), out=document.getElementById('f-outside'),
      only=document.getElementById('f-outside-only'), shown=document.getElementById('shown');
  function apply(){
    var qs=document.querySelectorAll('.query'), n=0;
    for(var i=0;i<qs.length;i++){
      var q=qs[i], show=(!rep.checked||q.getAttribute('data-replicated')==='1')&&
                        (!only.checked||q.getAttribute('data-outside-only')==='1');
      var ms=q.querySelectorAll('.mcard'), visible=0;
      for(var j=0;j<ms.length;j++){
        var keep=!out.checked||ms[j].getAttribute('data-in-subset')!=='1';
        ms[j].style.display=keep?'':'none'; if(keep) visible++;
      }
      if(out.checked&&visible===0) show=false;
      q.style.display=show?'':'none'; if(show) n++;
    }
    shown.textContent=n+' of '+qs.length+' queries shown';
  }
  // Filters can be preset by the link: report.html#replicated,outside,outside-only
  var preset=(location.hash||'').replace(/^#/,'').split(',');
  rep.checked=rep.checked||preset.indexOf('replicated')>=0;
  out.checked=out.checked||preset.indexOf('outside')>=0;
  only.checked=only.checked||preset.indexOf('outside-only')>=0;
  [rep,out,only].forEach(function(c){c.addEventListener('change',apply);});
  apply();
})();
